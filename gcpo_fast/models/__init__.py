"""The policy model: loading a Hugging Face causal LM and its tokenizer (loading.py), LoRA adapters through PEFT
(lora.py), packed attention that keeps rows apart in one decoder call (attention.py), and the per-device memory
plan made before any weight loads (memory.py)."""
