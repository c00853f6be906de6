"""What a run trains on, and how it is rewarded: datasets in TRL's or verl's layout and the resumable sampler
(files.py), where records come from (sources.py), the shipped math task (tasks.py, written out by
`python -m gcpo_fast.data --export DIR`: export.py), prompts to token ids (prompts.py) and their checks
(prompt_checks.py), and the reward functions (rewards.py). Nothing here loads a model."""
