"""Rollout engines, one interface: `generate(prompt_ids, n, sampling) -> Rollouts`, `sync_weights`, `sleep`,
`close` (base.py). Hugging Face generate on the training model (hf.py), vLLM in this process (vllm_engine.py), a
generation server's client (remote.py) with the weight stream it sends (weight_transport.py). factory.py alone
knows every engine; nothing here imports the round or the update."""
