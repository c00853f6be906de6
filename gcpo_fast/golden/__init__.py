"""GCPO's golden row, end to end: the one thing GCPO adds to the GRPO family.

A prompt whose G rollouts are all wrong teaches a group-relative method nothing; GCPO gives that group a golden
answer as one more row (or in place of a rollout), so the model learns where it cannot yet sample a right answer.
In order, as a round meets it (gcpo_fast/rounds.py calls `add_golden` once):

    options.py   every golden option in one group: golden_answer (append / replace / off; GCPO's recipe appends),
                 golden_objective (the clipped ratio, or LUFFY's shaped term) and the fused op's switches it sets,
                 golden_source and the teacher's options
    sources.py   where the answer comes from: the dataset's golden column, a teacher, or its cache; checked before
                 any model loads
    teacher.py   the teacher: k candidates of an all-wrong prompt, verified by the run's rewards, cached on disk
    rows.py      which groups get a golden row, the round's rows with them in place, the gcpo/* metrics
    offline.py   `python -m gcpo_fast.golden`: a teacher's cache filled before training

Downstream, a golden row is a row like any other with `golden` set: it has no engine log-probs (its sampling
weight is 1), and the fused op gives it the golden objective's term (gcpo_fast.kernels, LossInputs(golden=)).
"""
