"""Models by Hugging Face id: a tiny checkpoint and a tokenizer, written into an HF cache by
huggingface_hub's own download (from a stand-in Hub on localhost), resolve by their ids with
HF_HUB_OFFLINE=1 and load through the worker's loader and the frontend's tokenizer; an id that is
neither cached nor reachable is a clear error."""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir

from tests.conftest import REPO
from worker.loader import load_model

REPO_ID = "pagedserve-test/tiny-llama"
TOKENIZER_ID = "pagedserve-test/tokenizer"  # a repo of tokenizer files only
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the stand-in Hub's one commit


def _hub(repos: dict[str, dict[str, bytes]]) -> type[BaseHTTPRequestHandler]:
    """A stand-in for the Hub's file endpoint, /{repo id}/resolve/main/{filename}: HEAD answers
    the metadata huggingface_hub reads (commit, ETag, size), GET the bytes."""
    files = {
        f"/{repo}/resolve/main/{name}": body
        for repo, contents in repos.items()
        for name, body in contents.items()
    }

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _file(self) -> bytes | None:
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return body

        def do_HEAD(self) -> None:
            self._file()

        def do_GET(self) -> None:
            body = self._file()
            if body is not None:
                self.wfile.write(body)

    return Hub


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from scheduler.frontend.tokenizer import Tokenizer

    return Tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def hf_cache(tiny_models, smollm2_tokenizer, tmp_path_factory) -> Path:
    """An HF cache holding the tiny Llama checkpoint as REPO_ID and SmolLM2's tokenizer as
    TOKENIZER_ID, written by hf_hub_download."""
    import huggingface_hub
    from huggingface_hub import hf_hub_download

    directory, _ = tiny_models["llama"]
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    smollm2_tokenizer._tok.save_pretrained(tokenizer_dir)
    repos = {REPO_ID: _files(directory), TOKENIZER_ID: _files(tokenizer_dir)}
    assert {"config.json", "model.safetensors"} <= set(repos[REPO_ID])
    cache = tmp_path_factory.mktemp("hf-cache")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _hub(repos))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.MonkeyPatch.context() as patch:  # whatever this run's environment says
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            for repo, files in repos.items():
                for name in files:
                    hf_hub_download(
                        repo,
                        name,
                        cache_dir=cache,
                        endpoint=f"http://127.0.0.1:{server.server_address[1]}",
                    )
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
    return cache


def _resolve(call: str, **env: str) -> subprocess.CompletedProcess:
    """A cluster.models call (its source) in a fresh process with these HF_* variables
    (huggingface_hub reads them once, at import): prints the path, or the error on stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    code = f"from cluster.models import *; print({call})"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, "PYTHONPATH": REPO, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_id_resolves_offline_from_the_cache_and_loads(hf_cache, tiny_models):
    done = _resolve(f"resolve_model({REPO_ID!r})", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache))
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path == hf_cache / "models--pagedserve-test--tiny-llama" / "snapshots" / COMMIT
    assert (path / "model.safetensors").is_symlink()  # into blobs/, as the cache lays it out
    (repo,) = [r for r in scan_cache_dir(hf_cache).repos if r.repo_id == REPO_ID]
    assert [(r.commit_hash, r.refs) for r in repo.revisions] == [(COMMIT, frozenset({"main"}))]
    cpu = torch.device("cpu")
    from_cache = load_model(str(path), "auto", torch.float32, cpu, seed=0)
    directory, _ = tiny_models["llama"]
    original = dict(
        load_model(str(directory), "auto", torch.float32, cpu, seed=0).named_parameters()
    )
    for name, param in from_cache.named_parameters():
        assert torch.equal(param, original[name]), name


def test_a_tokenizer_resolves_by_id_without_weights(hf_cache, smollm2_tokenizer):
    from scheduler.frontend.tokenizer import Tokenizer

    call = f"resolve_tokenizer({TOKENIZER_ID!r}, 'llama-3.2-1b', 'dummy')"
    done = _resolve(call, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache))
    assert done.returncode == 0, done.stderr
    text = "What is the capital of France?"
    assert Tokenizer(done.stdout.strip()).encode(text) == smollm2_tokenizer.encode(text)
    # As a model it has no weights: the error says so.
    as_model = _resolve(
        f"resolve_model({TOKENIZER_ID!r})", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache)
    )
    assert as_model.returncode != 0
    assert "has no config.json with *.safetensors or *.bin weights" in as_model.stderr


def test_an_id_neither_cached_nor_reachable_names_the_id_and_the_cache(tmp_path):
    empty = tmp_path / "empty-cache"
    call = "resolve_model('nobody/no-such-model')"
    offline = _resolve(call, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(empty))
    assert offline.returncode != 0
    assert "'nobody/no-such-model'" in offline.stderr and str(empty) in offline.stderr
    assert "HF_HUB_OFFLINE is set" in offline.stderr
    # Online, but the Hub is unreachable: a closed port on localhost.
    unreachable = _resolve(call, HF_ENDPOINT="http://127.0.0.1:1", HF_HUB_CACHE=str(empty))
    assert unreachable.returncode != 0
    assert "'nobody/no-such-model'" in unreachable.stderr and str(empty) in unreachable.stderr
    assert "could not be downloaded" in unreachable.stderr


def test_a_name_that_is_no_path_and_no_repo_id_says_so():
    from cluster.models import resolve_model

    with pytest.raises(ValueError, match="nor a Hugging Face repo id"):
        resolve_model("./no/such//model")
