"""The two error classes a user can act on, and the check that raises the first.

    raise ConfigError("num_generations must be >= 2, got 1")        # an option that cannot run
    raise TrainingError("step 12: 3 steps in a row had a non-finite loss or gradient norm ...")

`python -m gcpo_fast.train` prints either (like the data errors, which are ValueErrors) as one line on
stderr, with exit status 2 for an option and 1 for the rest; anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """An option (or a combination of options) that cannot run."""


class TrainingError(RuntimeError):
    """A run that stops on purpose: DAPO's sampling cap, too many non-finite steps, non-finite weights."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)
