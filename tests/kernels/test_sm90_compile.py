"""Every Triton kernel compiles for sm_90 on the CPU (tests/kernels/sm90_compile.py, in a
process of its own: this directory's tests run Triton's interpreter, which must be chosen before
triton is imported). The interpreter runs a kernel's Python; only the compiler types all of it,
the branches the CPU never takes (programmatic dependent launch, the split decode's merge) too,
so an error there would otherwise first show on a GPU."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sm90_compile"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("compiled ")]
    kernels = {line.split("(")[0].removeprefix("compiled ") for line in compiled}
    assert kernels == {
        "_all_reduce_add_rms_norm_kernel",
        "_decode_kernel",
        "_prefill_kernel",
        "_rms_norm_kernel",
        "_rotary_kernel",
        "_rotary_kv_cache_kernel",
        "_write_kv_cache_kernel",
        "_copy_blocks_kernel",
        "_silu_and_mul_kernel",
        "_chunk_max_kernel",
        "_combine_kernel",
        "_shard_embedding_kernel",
        "_gemv_kernel",
        "_top_p_floor_kernel",
    }, compiled
    assert any("SPLIT=True" in line for line in compiled)  # the split decode's merge
    assert any("PDL=True" in line for line in compiled)
    # the prefill kernel's launches of a mixed step: one-token sequences, then the longer ones
    assert any("QUERY_LENS=1" in line for line in compiled)
    assert any("QUERY_LENS=2" in line for line in compiled)
