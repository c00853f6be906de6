"""Our fused loss inside other trainers. Each module imports its trainer library only when imported itself:

from gcpo_fast.integrations.trl import FusedGRPOTrainer    # needs trl (pip install -e ".[test]" has it)
"""
