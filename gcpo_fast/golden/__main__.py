"""`python -m gcpo_fast.golden --golden_model TEACHER --dataset FILE --golden_cache FILE` (golden/offline.py)."""

from gcpo_fast.golden.offline import main

main()
