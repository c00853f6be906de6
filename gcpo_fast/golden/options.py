"""GCPO's golden-answer options, all in one group (`--help`: "golden answers").

    from gcpo_fast.golden.options import GoldenConfig
    golden = GoldenConfig(golden_model="~/teacher").resolved("append", "gcpo", max_completion_length=256)
    golden.golden_answer, golden.golden_source        # "append", "dataset_then_teacher"
    golden.loss_switches()                            # the fused op's golden_objective, golden_shaping_gamma

golden_answer takes its default from `--loss_type` (GCPO's recipe appends a golden row; the other methods' is
off); the rest are GCPO's own.
"""

import dataclasses
from dataclasses import dataclass

from gcpo_fast.errors import ConfigError, require
from gcpo_fast.kernels import GOLDEN_OBJECTIVES, PolicyLossConfig
from gcpo_fast.options import RECIPE, at_least, check_options, option

GOLDEN_MODES = ("append", "replace", "off")
GOLDEN_SOURCES = ("dataset", "teacher", "dataset_then_teacher")


@dataclass
class GoldenConfig:
    """GCPO's golden answers, every option in one group: which all-wrong groups get one and how (golden_answer),
    the term a golden row trains with (golden_objective), and where the answers come from (the dataset, or a
    teacher model and its cache)."""

    _argument_group_name = "golden answers"

    golden_answer: str | None = option(
        None,
        f"GCPO: give all-wrong groups the golden answer as an extra row, instead of a rollout, or not {RECIPE}",
        choices=GOLDEN_MODES,
    )
    golden_objective: str = option(
        "policy_ratio",
        "GCPO: the golden rows' term: the clipped surrogate with the current policy as the old one (the paper's "
        "reading), or LUFFY's shaped p / (p + gamma), no clipping (docs/algorithms.md)",
        choices=GOLDEN_OBJECTIVES,
    )
    golden_shaping_gamma: float = option(0.1, "gamma of the shaped golden objective (LUFFY: 0.1)")

    golden_source: str | None = option(
        None,
        "GCPO: where golden answers come from: the dataset's golden column, a teacher (--golden_model, "
        "--golden_cache), or the dataset and, for records without one, the teacher (default: dataset_then_teacher "
        "when a teacher or cache is given, else dataset)",
        choices=GOLDEN_SOURCES,
    )
    golden_model: str | None = option(
        None,
        "GCPO: a teacher, a local Hugging Face causal LM folder, that writes golden answers for all-wrong prompts "
        "(verified by the reward functions, cached in output_dir/golden_cache.jsonl)",
    )
    golden_cache: str | None = option(
        None,
        "GCPO: a golden-answer cache filled offline (python -m gcpo_fast.golden), read at the start; without "
        "--golden_model it is the only teacher",
    )
    golden_num_candidates: int = option(
        4,
        "GCPO teacher: candidates per all-wrong prompt; the first the reward functions call correct becomes its "
        "golden answer",
    )
    golden_temperature: float = option(0.7, "GCPO teacher: sampling temperature of its candidates")
    golden_max_completion_length: int | None = option(
        None, "GCPO teacher: token budget per candidate, in the teacher's tokens (default: max_completion_length)"
    )

    def __post_init__(self):
        check_options(self)
        teacher = [f"--{name}" for name in ("golden_model", "golden_cache") if getattr(self, name)]
        if self.golden_source is None:
            self.golden_source = "dataset_then_teacher" if teacher else "dataset"
        require(
            self.golden_source == "dataset" or bool(teacher),
            f"golden_source {self.golden_source} needs a teacher: --golden_model FOLDER or --golden_cache FILE",
        )
        require(
            not teacher or self.golden_source != "dataset",
            f"{' and '.join(teacher)} would never be asked with golden_source dataset: use golden_source "
            "teacher or dataset_then_teacher",
        )
        at_least(self, 1, "golden_num_candidates", "golden_max_completion_length")
        require(self.golden_temperature > 0, f"golden_temperature must be > 0, got {self.golden_temperature}")

    @property
    def uses_teacher(self) -> bool:
        """Whether golden answers are asked of a teacher (or its cache) on this run."""
        return self.golden_answer != "off" and self.golden_source != "dataset"

    def resolved(self, recipe_answer: str, loss_type: str, max_completion_length: int) -> "GoldenConfig":
        """golden_answer from the method's recipe (GCPO: "append") and the teacher's budget, unless given; checked
        (the kernel's checks of the golden switches too)."""
        out = dataclasses.replace(
            self,
            golden_answer=recipe_answer if self.golden_answer is None else self.golden_answer,
            golden_max_completion_length=self.golden_max_completion_length or max_completion_length,
        )
        teacher = [f"--{name}" for name in ("golden_model", "golden_cache") if getattr(out, name)]
        require(
            not teacher or out.golden_answer != "off",
            f"{' and '.join(teacher)} would never be asked: golden_answer is off (loss_type {loss_type}); "
            "use --loss_type gcpo or --golden_answer append",
        )
        try:
            PolicyLossConfig(**out.loss_switches())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return out

    def loss_switches(self) -> dict:
        """The golden rows' switches of the fused op (gcpo_fast.kernels.PolicyLossConfig)."""
        return dict(golden_objective=self.golden_objective, golden_shaping_gamma=self.golden_shaping_gamma)
