"""The trainer's loss recipes (gcpo_fast/methods.py METHODS) through the kernel: each paper's clip box and GPG's
no-ratio switch. The kernel itself knows only the switches (tests/test_policy_loss.py)."""

import torch

from gcpo_fast.config import parse_config
from gcpo_fast.kernels import LossInputs, policy_loss


def _loss_config(method: str):
    return parse_config(["--loss_type", method]).loss_config()


def test_paper_defaults_per_loss_type():
    lp = torch.zeros(4, requires_grad=True)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    # GSPO/GCPO default box is 3e-4 / 4e-4: a sequence ratio of exp(1e-3) is clipped for A > 0.
    inputs = LossInputs(torch.ones(1), cu, old_logp=torch.full((4,), -1e-3))
    _, stats = policy_loss(lp, inputs, _loss_config("gcpo"))
    assert float(stats["clip_ratio/high_mean"]) == 1.0
    _, stats = policy_loss(lp, inputs, _loss_config("grpo"))
    assert float(stats["clip_ratio/high_mean"]) == 0.0
    # DAPO's clip-higher: 1.25 lies inside (0.8, 1.28) but outside GRPO's (0.8, 1.2).
    inputs = LossInputs(torch.ones(1), cu, old_logp=torch.full((4,), -torch.log(torch.tensor(1.25)).item()))
    _, s_dapo = policy_loss(lp, inputs, _loss_config("dapo"))
    _, s_grpo = policy_loss(lp, inputs, _loss_config("grpo"))
    assert float(s_dapo["clip_ratio/high_mean"]) == 0.0 and float(s_grpo["clip_ratio/high_mean"]) == 1.0


def test_gpg_runs_without_a_ratio():
    """GPG's loss is -A * logp (importance_sampling_level "none"): the gradient ignores how far old_logp is."""
    config = _loss_config("gpg")
    assert config.importance_sampling_level == "none"
    cu = torch.tensor([0, 4], dtype=torch.int32)
    grads = []
    for old in (torch.zeros(4), torch.full((4,), -3.0)):
        lp = torch.zeros(4, requires_grad=True)
        policy_loss(lp, LossInputs(torch.tensor([2.0]), cu, old_logp=old), config)[0].backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[0], torch.full((4,), -2.0 / 4))
    assert torch.equal(grads[0], grads[1])
