"""`python -m gcpo_fast.data --export DIR`: the shipped math task as JSONL files (gcpo_fast/data/export.py)."""

from gcpo_fast.data.export import main

main()
