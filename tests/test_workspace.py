"""The linear ops' workspace bound: device-sized on CUDA (from free memory, passed in here), 256 MiB on the CPU."""

import math

import torch

from gcpo_fast.kernels.linear_policy_loss import plan_chunks
from gcpo_fast.kernels.options import workspace_for_device, workspace_from_free_memory

GiB, MiB = 2**30, 2**20
QWEN_V = 152064


def test_an_eighth_of_free_memory_clamped_and_rounded_to_a_power_of_two():
    assert workspace_from_free_memory(1 * GiB) == 256 * MiB  # floor: today's CPU bound
    assert workspace_from_free_memory(16 * GiB) == 2 * GiB
    assert workspace_from_free_memory(20 * GiB) == 2 * GiB  # 2.5 GiB rounds down
    assert workspace_from_free_memory(100 * GiB) == 4 * GiB  # ceiling (an H200 with the model loaded)
    assert workspace_from_free_memory(0) == 256 * MiB
    # a little more or less free memory does not move the bound, so the chunking (and dW's bits) stay put
    assert {workspace_from_free_memory(f * GiB) for f in (17, 20, 24, 31)} == {2 * GiB}


def test_chunks_at_qwen_vocabulary():
    """fp32 dZ rows of V = 152064: 4 GiB holds 7061 tokens (N = 16384: 3 chunks, 65536: 10); 256 MiB 441 (38, 149)."""
    for workspace, rows, counts in ((4 * GiB, 7061, (3, 10)), (256 * MiB, 441, (38, 149))):
        chunk = workspace // (4 * QWEN_V)
        assert chunk == rows
        for n, count in zip((16384, 65536), counts):
            assert math.ceil(n / chunk) == count
            assert len(plan_chunks(torch.tensor([0, n]), n, chunk, rows_must_stay_whole=False)) == count


def test_cpu_keeps_256_mib_and_an_explicit_bound_wins():
    assert workspace_for_device(None, torch.device("cpu")) == 256 * MiB
    assert workspace_for_device(12345, torch.device("cpu")) == 12345
    assert workspace_for_device(12345, torch.device("cuda")) == 12345  # no device query when given
