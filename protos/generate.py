"""Generates the Python stubs of protos/*.proto into a directory (default: protos/ itself).

Run from anywhere: `python -m protos.generate [OUT_DIR]`. Imports in the stubs are rooted at the
package (`from protos import worker_pb2`), so they work wherever the checkout is on sys.path.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("serving.proto", "worker.proto", "frontend.proto")


def generate(out_dir: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto; returns the files written."""
    root = PROTO_DIR.parent
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTO_DIR / name) for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((Path(tmp) / PROTO_DIR.name).iterdir()):
            shutil.copy(path, out_dir / path.name)
            written.append(out_dir / path.name)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for f in generate(target):
        print(f)
