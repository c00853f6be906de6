"""A run's life: its options and state (state.py), checkpoints that a crash cannot break (checkpoint.py), what
`--resume` accepts (resume_policy.py), one run per directory (lock.py), metrics and samples on disk and on the
console (logger.py), and where a step's time goes (timing.py)."""
