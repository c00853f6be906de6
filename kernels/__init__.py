"""Fused linear log-prob and packed policy-loss ops (imported as gcpo_fast.kernels)."""
