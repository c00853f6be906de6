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


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs. Tiny matmuls gain nothing from a thread pool, and on a busy
    machine the pool's synchronisation stalls them (seen here: 17 ms per [20, 32] x [32, 64] matmul with
    2 threads under load, 3 us with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The shipped model and eight held-out prompts, for the engine tests (in-process, server, vLLM); a test file with
# a fixture of the same name uses its own.
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from gcpo_fast.models.loading import DEFAULT_MODEL  # imported here: TRITON_INTERPRET is set first (above)

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def hf():
    """The shipped model in fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    from gcpo_fast.models.loading import DEFAULT_MODEL

    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    from gcpo_fast.data.prompts import encode_prompts
    from gcpo_fast.data.sources import load_records

    records = load_records("builtin", split="test", num_problems=8)
    return encode_prompts(tokenizer, [r["prompt"] for r in records], max_prompt_length=128)


@pytest.fixture(scope="session")
def golden_models(tmp_path_factory):
    """(policy folder, teacher folder) of the golden-answer tests (tests/test_golden_*.py, helpers in
    tests/golden_setup.py): the teacher is trained once a session (10-20 s), on one thread."""
    from golden_setup import make_teacher
    from tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("golden")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    teacher = make_teacher(root / "teacher")
    torch.set_num_threads(n)
    return make_tiny_model(root / "policy"), teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random Qwen2 model folder and 12 training records (tests/tiny_model.py), for the stage tests."""
    from tiny_model import make_tiny_model, write_jsonl

    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), write_jsonl(root / "train.jsonl", n=12)
