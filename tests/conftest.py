"""Shared pytest setup.

Without a CUDA GPU, Triton kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET
must be set before triton is first imported, which is why this happens at conftest import time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """ "cuda" when a GPU is present, else "cpu" (Triton kernels then run in the interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
