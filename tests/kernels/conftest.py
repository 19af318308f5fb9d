"""The Triton kernels' tests run everywhere: compiled on a CUDA device, else in Triton's CPU
interpreter. TRITON_INTERPRET must be set before triton is first imported (triton.language's
own jitted helpers are built at import time), so it is set here, when pytest loads this file,
ahead of every test module of this directory; kernels/ imports triton only on a CUDA call.
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_TRITON_IMPORTED_EARLY = False
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        _TRITON_IMPORTED_EARLY = True
    else:
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run: the GPU, or the CPU under TRITON_INTERPRET=1."""
    if _TRITON_IMPORTED_EARLY:
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
            "near the top of tests/conftest.py, before anything imports triton, add: "
            'if not __import__("torch").cuda.is_available(): '
            'os.environ.setdefault("TRITON_INTERPRET", "1")'
        )
    return torch.device("cuda" if HAS_CUDA else "cpu")
