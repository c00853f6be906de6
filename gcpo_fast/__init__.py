"""gcpo_fast: GCPO-style RL post-training around one fused linear policy-loss op."""
