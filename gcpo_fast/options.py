"""What every component's options dataclass is made of: fields with their --help text, and self-checks.

    from gcpo_fast.options import option, check_options

    @dataclass
    class RolloutConfig:
        _argument_group_name = "generation"                       # the --help section (HfArgumentParser)
        num_generations: int = option(8, "G: completions sampled per prompt (>= 2)")

        def __post_init__(self):
            check_options(self)                                   # finite floats, choices
            require(self.num_generations >= 2, "num_generations must be >= 2, ...")

Each component owns its options (gcpo_fast/config.py composes them into one command line). A field's
metadata is handed to argparse as is (help, choices, metavar), so it holds nothing else. An option whose
default a method fills in (`--loss_type`'s recipe) defaults to None and says so in its help.
"""

import dataclasses
import math

from gcpo_fast.errors import require

RECIPE = "(default: from --loss_type)"


def option(default, help: str, **argparse_kwargs):
    """A dataclass field with its --help text and argparse options (choices, metavar)."""
    metadata = dict(help=help, **argparse_kwargs)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_options(options) -> None:
    """Every float option is finite (argparse, YAML and JSON all read nan and inf, and a NaN passes every
    `x >= 0` check unnoticed) and every option with choices holds one of them (a --config file skips argparse)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float):
                require(math.isfinite(v), f"{f.name} must be a finite number, got {v}")
            choices = f.metadata.get("choices")
            if choices is not None and v is not None:
                require(v in choices, f"{f.name} must be one of {', '.join(map(str, choices))}, got {v!r}")


def at_least(options, minimum: int, *names: str) -> None:
    """Each named integer option is >= minimum."""
    for name in names:
        value = getattr(options, name)
        require(value is None or value >= minimum, f"{name} must be >= {minimum}, got {value}")
