"""Many processes: the process group, the policy as the update sees it (bare, DDP or FSDP2), reductions across
ranks (parallel.py), and FSDP's sharded optimizer state read without trusting its pickle (dcp_reader.py)."""
