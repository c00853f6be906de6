"""`python -m gcpo_fast.train --use_vllm --use_peft` for real on the CPU (skipped where vLLM or PEFT is missing).

    OMP_NUM_THREADS=1 /tmp/venv-vllm/bin/python -m pytest -q tests/test_vllm_lora.py

Three LoRA steps of the shipped default with rollouts from vLLM, at a learning rate large enough that the
adapters move the policy far in one step: after every step the engine gets the merged weights (W + delta under
the base model's names, gcpo_fast/models/lora.py), so the trainer's log-probs of vLLM's samples stay within fp32 noise
of vLLM's own (an engine left on the base weights would be far off: tests/test_vllm_engine.py measures that gap
for a full-weight step; with the base weights sent instead of the merged ones, the gap after step 1 is ~10
nats). --lora_dropout 0: dropout would make the trainer's log-probs noisy on purpose.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("peft")


def test_vllm_samples_from_the_merged_adapters(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "gcpo_fast.train", "--use_vllm", "--use_peft", "--lora_dropout", "0"]
    cmd += ["--max_steps", "3", "--output_dir", str(out), "--learning_rate", "3e-2", "--warmup_ratio", "0"]
    cmd += ["--eval_steps", "0"]
    cmd += ["--save_steps", "0", "--per_device_train_batch_size", "32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert m["sampling/sampling_logp_difference/max"] < 1e-3, m
        assert 0.99 < m["sampling/importance_sampling_ratio/mean"] < 1.01, m
    assert all("timing/weight_sync" in m for m in lines)  # the first round too: the engine loaded the bare base
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()


def test_vllm_own_lora_adapter_follows_the_peft_policy(tmp_path):
    """VLLMEngine(max_lora_rank=...) serves a PEFT adapter folder through vLLM's LoRA (what
    benchmarks/bench_vllm_lora.py measures against the merged sync): its log-probs are the adapted model's."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from gcpo_fast.data.tasks import heldout_split
    from gcpo_fast.engines.vllm_engine import VLLMEngine
    from gcpo_fast.models.loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer
    from gcpo_fast.models.lora import PeftOptions, attach

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    options = PeftOptions(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    model = attach(load_causal_lm(DEFAULT_MODEL, device="cpu"), options, base_path=DEFAULT_MODEL).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "adapter")
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in heldout_split(8, seed=0)]
    engine = VLLMEngine(DEFAULT_MODEL, tokenizer, max_model_len=256, dtype="float32", max_lora_rank=8)
    try:
        request = LoRARequest("adapter", 1, str(tmp_path / "adapter"))
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, detokenize=False)
        batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        adapted, base = (engine.llm.generate(batch, params, use_tqdm=False, lora_request=r) for r in (request, None))
    finally:
        engine.close()
    with torch.no_grad():
        for ids, out, out_base in zip(prompts, adapted, base, strict=True):
            token = out.outputs[0].token_ids[0]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
            assert abs(out.outputs[0].logprobs[0][token].logprob - logp[token].item()) < 1e-4
            with model.disable_adapter():
                base_logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
            token = out_base.outputs[0].token_ids[0]
            assert abs(out_base.outputs[0].logprobs[0][token].logprob - base_logp[token].item()) < 1e-4
            assert (logp - base_logp).abs().max() > 1e-2  # the adapter moves the policy: the check can fail
