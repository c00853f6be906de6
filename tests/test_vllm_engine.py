"""VLLMEngine against Hugging Face, with real vLLM on the CPU (skipped where vLLM is not installed).

    .ci/vllm_env /tmp/venv-vllm && OMP_NUM_THREADS=1 /tmp/venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py

The shipped model in fp32 on both sides: the references are the Hugging Face model's own logits, in fp64 from
the log-softmax on. The two engines run different fp32 kernels (vLLM's CPU attention, fused qkv / gate_up
matmuls): their log-probs agree to ~2e-5 on this model, so LOGP_TOL = 1e-3 leaves 50x headroom, while the
AdamW step of the sync test (lr 1e-2) moves them by ~14 (the test asks for > 100 x LOGP_TOL). One engine
serves the module; the torchrun test starts two more in two processes. ~2 min on a 2-core machine.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.sources import load_records  # noqa: E402
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine  # noqa: E402
from gcpo_fast.engines.vllm_engine import VLLMEngine  # noqa: E402
from gcpo_fast.models.loading import DEFAULT_MODEL  # noqa: E402

LOGP_TOL = 1e-3
TIE_TOL = 1e-3  # a greedy choice may differ only where HF's top two logits are this close (fp32 noise ~1e-5)


def sampling(**overrides):
    return Sampling(
        **{**dict(max_completion_length=64, temperature=1.0, top_p=1.0, top_k=0, greedy=False), **overrides}
    )


@pytest.fixture(scope="module")
def engine(tokenizer):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves a fraction of all host RAM
        engine = VLLMEngine(
            DEFAULT_MODEL,
            tokenizer,
            seed=0,
            gpu_memory_utilization=0.2,
            max_model_len=384,
            enable_sleep_mode=True,
            dtype="float32",
        )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    records = load_records("builtin", split="test", num_problems=64)
    return encode_prompts(tokenizer, [r["prompt"] for r in records], max_prompt_length=256)


@torch.no_grad()
def hf_logprobs(model, prompt, completion, temperature=1.0, top_k=0):
    """fp64 log-probs of the completion tokens under the model at this temperature (renormalised over the
    top_k logits when top_k > 0), and the raw logits at those positions."""
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
    scaled = logits / temperature
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    logp = torch.log_softmax(scaled, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
    return logp, logits


def test_greedy_matches_generate(engine, hf, tokenizer, prompt_ids):
    ours = engine.generate(prompt_ids, 1, sampling(greedy=True))
    ref = HFEngine(hf, tokenizer).generate(prompt_ids, 1, sampling(greedy=True))
    assert ours.prompt_ids == ref.prompt_ids
    same = sum(a == b for a, b in zip(ours.completion_ids, ref.completion_ids, strict=True))
    assert same >= 0.95 * len(prompt_ids), f"{same}/{len(prompt_ids)} greedy completions agree"
    for prompt, a, b in zip(prompt_ids, ours.completion_ids, ref.completion_ids):
        if a == b:
            continue
        j = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # a and b both end at EOS or the budget
        _, logits = hf_logprobs(hf, prompt, b[: j + 1])
        top2 = logits[-1].topk(2)
        assert set(top2.indices.tolist()) == {a[j], b[j]}, "the two engines picked tokens that are not HF's top two"
        assert top2.values[0] - top2.values[1] < TIE_TOL, f"greedy paths split at a gap of {top2.values.tolist()}"
    # greedy rows carry the log-probs of the untempered distribution
    for prompt, ids, logp in list(zip(prompt_ids, ours.completion_ids, ours.sampling_logp))[:16]:
        expected, _ = hf_logprobs(hf, prompt, ids)
        assert (expected - torch.tensor(logp, dtype=torch.float64)).abs().max() < LOGP_TOL
    # the model solves its held-out problems: the completions are answers, not noise
    assert sum("\\boxed{" in t for t in ours.texts) >= 0.9 * len(prompt_ids)


def test_sampled_rollouts(engine, hf, tokenizer, prompt_ids):
    n, budget, temperature = 4, 24, 0.7
    prompts = prompt_ids[:16]
    out = engine.generate(prompts, n, sampling(max_completion_length=budget, temperature=temperature))
    assert len(out.completion_ids) == len(out.truncated) == len(out.texts) == len(out.sampling_logp) == 16 * n
    assert out.prompt_ids == [p for p in prompts for _ in range(n)]
    eos = set(engine.eos_ids)
    assert eos == {tokenizer.eos_token_id, hf.generation_config.eos_token_id}
    assert 0 < sum(out.truncated) < 16 * n  # the budget cuts some (answers take ~30 tokens), not all
    worst = 0.0
    for prompt, ids, cut, text, logp in zip(
        out.prompt_ids, out.completion_ids, out.truncated, out.texts, out.sampling_logp
    ):
        assert 1 <= len(ids) <= budget and len(logp) == len(ids)
        assert not eos & set(ids[:-1]) and cut == (ids[-1] not in eos)
        assert not cut or len(ids) == budget
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        ref, _ = hf_logprobs(hf, prompt, ids, temperature)
        worst = max(worst, (ref - torch.tensor(logp, dtype=torch.float64)).abs().max().item())
    assert worst < LOGP_TOL, f"vLLM's sampling log-probs are {worst:.2e} from HF's temperature-scaled ones"
    # n samples of a prompt are different draws, not copies
    assert sum(len({tuple(c) for c in out.completion_ids[i * n : (i + 1) * n]}) > 1 for i in range(16)) >= 8


def test_top_k_logprobs_are_of_the_truncated_distribution(engine, hf, prompt_ids):
    top_k = 3
    out = engine.generate(prompt_ids[:8], 2, sampling(max_completion_length=16, temperature=1.5, top_k=top_k))
    worst, lifted = 0.0, 0.0
    for prompt, ids, logp in zip(out.prompt_ids, out.completion_ids, out.sampling_logp):
        truncated_ref, logits = hf_logprobs(hf, prompt, ids, 1.5, top_k=top_k)
        full_ref, _ = hf_logprobs(hf, prompt, ids, 1.5)
        assert all(t in row.topk(top_k).indices.tolist() for t, row in zip(ids, logits))
        ours = torch.tensor(logp, dtype=torch.float64)
        worst = max(worst, (truncated_ref - ours).abs().max().item())
        lifted = max(lifted, (ours - full_ref).max().item())
    assert worst < LOGP_TOL
    assert lifted > 10 * LOGP_TOL  # what the module docstring says: higher than the trainer's by -log(kept mass)


@torch.no_grad()
def engine_sequence_logprobs(engine, sequences):
    """The engine's log-probs of each token after the first of fixed sequences (vLLM prompt log-probs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    return [
        torch.tensor([pos[t].logprob for t, pos in zip(s[1:], o.prompt_logprobs[1:])], dtype=torch.float64)
        for s, o in zip(sequences, outs, strict=True)
    ]


def max_gap(engine, model, sequences):
    ours = engine_sequence_logprobs(engine, sequences)
    return max((hf_logprobs(model, s[:1], s[1:])[0] - o).abs().max().item() for s, o in zip(sequences, ours))


def test_sync_weights_after_an_optimizer_step(engine, hf, prompt_ids):
    greedy = engine.generate(prompt_ids[:8], 1, sampling(greedy=True))
    sequences = [p + c for p, c in zip(greedy.prompt_ids, greedy.completion_ids)]
    assert max_gap(engine, hf, sequences) < LOGP_TOL
    trained = copy.deepcopy(hf).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    width = min(len(s) for s in sequences)
    batch = torch.tensor([s[:width] for s in sequences])
    trained(batch, labels=batch).loss.backward()
    optimizer.step()
    trained.eval()
    engine.sleep()  # a no-op on CPU (no sleep mode there); on a GPU it frees the weights until the sync
    assert engine.asleep == engine.sleep_mode  # CPU: no sleep mode, the engine stays awake
    stale = max_gap(engine, trained, sequences)
    try:
        engine.sync_weights(trained.named_parameters())
        synced = max_gap(engine, trained, sequences)
    finally:
        engine.sync_weights(hf.named_parameters())  # the module's engine goes back to the shipped weights
    assert synced < LOGP_TOL, f"after sync_weights the engine is {synced:.2e} from the trained model"
    print(f"log-prob gap to the trained model: {stale:.2e} before the sync, {synced:.2e} after")
    assert stale > 100 * LOGP_TOL, (
        f"the step barely moved the log-probs ({stale:.2e}): the test would not see a missing sync"
    )
    assert max_gap(engine, hf, sequences) < LOGP_TOL  # and a second sync takes it back


def test_vllm_missing_is_one_line(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(ImportError, match=r"vLLM is not installed .*pip install vllm") as e:
        VLLMEngine(DEFAULT_MODEL, tokenizer, seed=0)
    assert "\n" not in str(e.value)


def test_unloadable_model_is_one_line(tokenizer, tmp_path):
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{DEFAULT_MODEL}/{f}", tmp_path / f)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ValueError, match="vLLM cannot load the model .*NoSuchModelForCausalLM") as e:
        VLLMEngine(tmp_path, tokenizer, seed=0, gpu_memory_utilization=0.2, dtype="float32")
    assert "\n" not in str(e.value)


TORCHRUN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from gcpo_fast.models.loading import DEFAULT_MODEL
    from gcpo_fast.engines.base import Sampling
    from gcpo_fast.data.prompts import encode_prompts
    from gcpo_fast.data.sources import load_records
    from gcpo_fast.engines.vllm_engine import VLLMEngine

    dist.init_process_group("gloo")  # as gcpo_fast.train does under torchrun, before the engine
    rank = dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    engine = VLLMEngine(DEFAULT_MODEL, tokenizer, seed=rank, gpu_memory_utilization=0.2, max_model_len=128,
                        dtype="float32")
    sampling = Sampling(max_completion_length=32, temperature=1.0, top_p=1.0, top_k=0, greedy=False)
    records = load_records("builtin", split="test", num_problems=8)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records], max_prompt_length=64)
    sampled = engine.generate(prompts, 2, sampling).completion_ids
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(0.5)  # a visible change, pushed by each rank into its own engine

    def gap():  # the engine's sampling log-probs against the changed model's, on fresh samples
        out = engine.generate(prompts[:2], 1, sampling)
        worst = 0.0
        for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.sampling_logp):
            with torch.no_grad():
                logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].double()
            ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None])[:, 0]
            worst = max(worst, (ref - torch.tensor(lp, dtype=torch.float64)).abs().max().item())
        return worst

    stale = gap()
    engine.sync_weights(model.named_parameters())
    synced = gap()
    greedy = Sampling(max_completion_length=32, greedy=True)
    completion = engine.generate(prompts[:1], 1, greedy).completion_ids[0]
    gathered = [None, None]
    dist.all_gather_object(gathered, sampled)
    engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    result = dict(rank=rank, ranks_differ=gathered[0] != gathered[1], completion=completion, stale=stale, synced=synced)
    with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:  # a file, not stdout, which both ranks' vLLM logs share
        json.dump(result, f)
""")


def test_two_ranks_under_torchrun(tmp_path):
    """One engine per rank on gloo (CPU), seeded per rank: the ranks draw different samples, sync their own
    engines, and the run exits cleanly."""
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # set by the module's engine
        env.pop(var, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["ranks_differ"] for r in results)
    assert results[0]["completion"] == results[1]["completion"]  # same synced weights, same greedy path
    assert all(r["synced"] < LOGP_TOL < 100 * LOGP_TOL < r["stale"] for r in results), results
