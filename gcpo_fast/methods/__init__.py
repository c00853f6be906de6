"""The methods of the GRPO family, one unit each: GCPO, GSPO, GRPO, DAPO, Dr. GRPO, BNPO, GPG.

A method is its paper's option values, its advantage rule, its sampling rule and the options it has no use for:
recipes.py holds the table (METHODS) and the options that `--loss_type` fills in (MethodConfig); base.py the
clipped-surrogate methods' unit; dapo.py DAPO's dynamic sampling and overlong shaping; gpg.py GPG's alpha and
resampling; advantages.py the group statistics every method starts from. GCPO's golden rows have a home of their
own, gcpo_fast/golden/. The math of each is docs/algorithms.md ("The methods"); the kernels only see the switches.
"""
