"""Reductions across ranks (gcpo_fast/distributed/parallel.py), on 2 gloo ranks whose values differ: each metric is
reduced by its kind (a minimum as the minimum, a maximum as the maximum, a count as the sum, the rest as the
mean), not every one averaged."""

import os

import pytest
import torch.multiprocessing as mp

from gcpo_fast.distributed.parallel import free_port, metric_reduction, reduce_over_ranks

RANK_METRICS = [  # what each rank measured
    {"reward": 0.25, "completions/min_length": 7, "completions/max_length": 40, "sampling/x/min": -2.0,
     "sampling/x/max": 1.5, "async/staleness_max": 1, "gcpo/golden_rows": 3, "tokens": 100, "entropy": 0.5},
    {"reward": 0.75, "completions/min_length": 12, "completions/max_length": 31, "sampling/x/min": -0.5,
     "sampling/x/max": 3.0, "async/staleness_max": 2, "gcpo/golden_rows": 0, "tokens": 60, "entropy": 0.25},
]  # fmt: skip
EXPECTED = {
    "reward": 0.5,
    "completions/min_length": 7.0,
    "completions/max_length": 40.0,
    "sampling/x/min": -2.0,
    "sampling/x/max": 3.0,
    "async/staleness_max": 2.0,
    "gcpo/golden_rows": 3.0,
    "tokens": 160.0,
    "entropy": 0.375,
}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from gcpo_fast.distributed.parallel import init_distributed

    init_distributed()
    import torch.distributed as dist

    got = reduce_over_ranks(RANK_METRICS[rank])
    (out / f"rank{rank}.txt").write_text(repr(sorted(got.items())))
    dist.destroy_process_group()  # a gloo group left open aborts the process at exit


def test_two_ranks_reduce_each_metric_by_its_kind(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    for rank in range(2):
        assert eval((tmp_path / f"rank{rank}.txt").read_text()) == sorted(EXPECTED.items())


@pytest.mark.parametrize(
    "name, kind",
    [("completions/min_length", "min"), ("clip_ratio/low_min", "min"), ("sampling/d/max", "max"),
     ("async/staleness_max", "max"), ("gcpo/golden_rows", "sum"), ("gcpo/frac_all_wrong", "mean")],
)  # fmt: skip
def test_the_kind_of_a_metric_is_read_off_its_name(name, kind):
    assert metric_reduction(name) == kind


def test_one_process_returns_its_own_values_as_floats_in_name_order():
    got = reduce_over_ranks({"b": 3, "a/min": 2})
    assert list(got.items()) == [("a/min", 2.0), ("b", 3.0)] and all(isinstance(v, float) for v in got.values())
