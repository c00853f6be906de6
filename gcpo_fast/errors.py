"""The one error class a run raises when it cannot go on for a reason the user can act on.

    raise TrainingError("step 12: 3 steps in a row had a non-finite loss or gradient norm ...")

`python -m gcpo_fast.train` prints it (like ConfigError and the data errors, which are ValueErrors) as one
line on stderr and exits with status 1; anything else is a bug and keeps its traceback.
"""


class TrainingError(RuntimeError):
    """A run that stops on purpose: DAPO's sampling cap, too many non-finite steps, non-finite weights."""
