"""Rollouts: prompts to token ids, and the rollout engine that samples G completions per prompt.

    from gcpo_fast.rollout import HFEngine, Sampling, encode_prompts, encode_completion

    engine = make_engine(cfg.vllm, model, tokenizer, path, bf16=True, seed=0, max_model_len=384)  # or VLLMEngine
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in batch], max_prompt_length=512)
    out = engine.generate(prompt_ids, 8, Sampling(max_completion_length=256, temperature=1.0))
    out.prompt_ids[k], out.completion_ids[k], out.truncated[k], out.texts[k]   # row k = prompt k // 8
    engine.sync_weights(policy.named_parameters())          # after each optimizer step (a no-op here)
    ids, truncated = encode_completion(tokenizer, golden_text, 256)             # a golden answer as a completion

A rollout engine is any object with `eos_ids`, `generate(prompt_ids, n, sampling) -> Rows`,
`sync_weights(named_tensors)`, `sleep()` (free its memory while the trainer updates; `asleep` says whether
it did, and a sync wakes it) and `close()`: the trainer, the evaluation and the model builder call nothing
else, so another engine is one more class, not branches in the loop: VLLMEngine (gcpo_fast/vllm_engine.py,
vLLM in this process) and RemoteEngine (gcpo_fast/remote_engine.py, a generation server's client). `HFEngine`
runs Hugging Face `generate` on the training model; its weights are the trainer's, so its sync does nothing.
An engine that samples elsewhere also returns the per-token log-probs it sampled with (`Rows.sampling_logp`;
HFEngine too with sampling_logprobs=True, as the generation server's HF backend uses it).

Prompts go through the tokenizer's chat template when it has one (a plain-text prompt becomes one user
message), else they are tokenised as plain text; either way, too-long prompts keep their last
max_prompt_length tokens (a text longer than max_prompt_length x CHARS_PER_TOKEN characters is cut to that
many last characters before tokenising: the same tokens, unless one word spans the cut, at a fraction of
the cost). HFEngine generates all prompts x n rows in one batched `generate` with the KV
cache and left padding. The trainer keeps the generated token ids as they are (never re-tokenised
text): a completion is cut after its first EOS (kept, so the model learns to stop), and a completion
with no EOS within the budget is "truncated".
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateError
from transformers import GenerationConfig

from gcpo_fast.errors import require
from gcpo_fast.models import autocast
from gcpo_fast.options import at_least, check_options, option


@dataclass(frozen=True)
class Sampling:
    """How an engine samples: greedy decoding, or temperature with optional top-p / top-k (0: off)."""

    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class RolloutConfig:
    """How rollouts are sampled and how long they may be."""

    _argument_group_name = "generation"

    num_generations: int = option(8, "G: completions sampled per prompt (>= 2)")
    max_prompt_length: int = option(256, "prompt token budget; longer prompts keep their last tokens")
    max_completion_length: int = option(128, "completion token budget (new tokens per rollout)")
    temperature: float = option(1.0, "sampling temperature; the log-probs of the loss use it too")
    top_p: float = option(1.0, "nucleus sampling threshold (1: off)")
    top_k: int = option(0, "top-k sampling (0: off)")
    mask_truncated_completions: bool = option(False, "completions cut by the budget (no EOS) take no part in the loss")

    def __post_init__(self):
        check_options(self)
        require(
            self.num_generations >= 2,
            "num_generations must be >= 2 (group advantages need at least two completions), "
            f"got {self.num_generations}",
        )
        at_least(self, 1, "max_prompt_length", "max_completion_length")
        at_least(self, 0, "top_k")
        require(self.temperature > 0, f"temperature must be > 0 for training (sampling), got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_completion_length, self.temperature, self.top_p, self.top_k)


@dataclass
class Rows:
    """Rows, each a prompt and a completion: an engine's output, then a generation round's training rows.

    An engine fills the first five fields (row k of generate(prompts, n) is prompt k // n); the round
    (gcpo_fast/rounds.py) adds golden rows and sets `golden` and `advantages`; its micro-batches are
    selections of these rows, each packed once (gcpo_fast/packing.py)."""

    prompt_ids: list[list[int]]  # per row; the rows of one prompt share the same list
    completion_ids: list[list[int]]  # per row, up to and including the first EOS
    truncated: list[bool]  # per row: no EOS within max_completion_length
    texts: list[str]  # per row: the completion decoded without special tokens
    # per row and completion token: the log-prob the engine sampled with, when it reports them (vLLM);
    # None for a golden row, never sampled
    sampling_logp: list[list[float] | None] | None = None
    golden: list[bool] | None = None  # per row: a golden answer (GCPO), not a rollout; None: none are
    advantages: torch.Tensor | None = None  # [B]
    # per row: the policy version (the trainer's optimizer step) whose weights sampled it, when the engine
    # samples elsewhere (a server, ahead of the trainer); None for a golden row
    policy_version: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    def __add__(self, other: "Rows") -> "Rows":
        def join(a, b):
            return None if a is None or b is None else a + b

        return Rows(
            self.prompt_ids + other.prompt_ids,
            self.completion_ids + other.completion_ids,
            self.truncated + other.truncated,
            self.texts + other.texts,
            join(self.sampling_logp, other.sampling_logp),
            join(self.golden, other.golden),
            None
            if self.advantages is None or other.advantages is None
            else torch.cat([self.advantages, other.advantages]),
            join(self.policy_version, other.policy_version),
        )

    def select(self, rows: list[int]) -> "Rows":
        """The rows at these indices, in that order."""

        def pick(values):
            return None if values is None else [values[i] for i in rows]

        return Rows(
            pick(self.prompt_ids),
            pick(self.completion_ids),
            pick(self.truncated),
            pick(self.texts),
            pick(self.sampling_logp),
            pick(self.golden),
            None if self.advantages is None else self.advantages[rows],
            pick(self.policy_version),
        )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation_config EOS ids
    (chat models often stop at an end-of-turn token that differs from the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError(
            "the tokenizer has no eos_token and the model's generation_config no eos_token_id: "
            "completions could never end"
        )
    return ids


def encode_prompts(tokenizer, prompts, max_prompt_length: int) -> list[list[int]]:
    """Token ids of each prompt (text or chat messages), chat template applied when the tokenizer has one."""
    out = []
    for prompt in prompts:
        if tokenizer.chat_template is not None:
            text = render_prompt(tokenizer, messages_of(prompt), f"prompt {str(prompt)[:60]!r}")
            # the template wrote any BOS itself
            ids = tokenizer(_tail(text, max_prompt_length), add_special_tokens=False).input_ids
        elif isinstance(prompt, str):
            ids = tokenizer(_tail(prompt, max_prompt_length)).input_ids  # BOS where the tokenizer adds one
        else:
            raise ValueError("a chat-message prompt needs a tokenizer with a chat template; this one has none")
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        out.append(ids[-max_prompt_length:])
    return out


CHARS_PER_TOKEN = 64  # far more characters than any token of a real vocabulary spans


def _tail(text: str, max_prompt_length: int) -> str:
    """The end of a text too long to tokenise whole for the last max_prompt_length tokens: its last
    max_prompt_length x CHARS_PER_TOKEN characters (a 10 MB prompt took 44 s and 3.4 GB to tokenise whole)."""
    keep = max_prompt_length * CHARS_PER_TOKEN
    return text if len(text) <= keep else text[-keep:]


def messages_of(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render_prompt(tokenizer, messages: list[dict], where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        roles = ", ".join(m["role"] for m in messages)
        raise ValueError(f"{where}: the tokenizer's chat template refuses its messages (roles {roles}): {e}") from None


def encode_completion(tokenizer, text: str, max_completion_length: int) -> tuple[list[int], bool]:
    """A text (GCPO's golden answer) as completion ids: tokens + EOS, cut to the budget; (ids, truncated).
    It follows the prompt ids of encode_prompts, which end where the template's assistant turn begins."""
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return ids[:max_completion_length], len(ids) > max_completion_length


def cut_at_eos(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, whether there was none)."""
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1], False
    return ids, True


class HFEngine:
    """Rollouts from Hugging Face `generate` on the training model itself (bf16 autocast on CUDA when asked)."""

    asleep = False  # it never frees anything: the training model is the engine

    def __init__(self, model, tokenizer, *, bf16: bool = False, sampling_logprobs: bool = False):
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        # with sampling_logprobs, Rows.sampling_logp: the log-softmax of the scores each token was drawn from,
        # after temperature / top-k / top-p (vLLM's processed_logprobs); for a model that is not the trainer's
        self.sampling_logprobs = sampling_logprobs
        self.eos_ids = eos_token_ids(model, tokenizer)  # fails now, not after a round, if nothing ends a completion

    def sync_weights(self, named_tensors, version: int = 0) -> None:
        """Nothing to do: this engine samples with the trainer's own weights."""

    def sleep(self) -> None:
        """Nothing to free (an engine with memory of its own releases it here while the trainer updates)."""

    def close(self) -> None:
        """Nothing to shut down."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> Rows:
        """n completions of every prompt, prompt-major rows. Runs the model in eval mode and restores its mode."""
        model, tokenizer, eos = self.model, self.tokenizer, self.eos_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        rows = [ids for ids in prompt_ids for _ in range(n)]
        width = max(len(ids) for ids in rows)
        device = next(model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
        # A full GenerationConfig, so that sampling settings saved with the model (repetition penalty,
        # its own temperature) never leak into the rollouts: the loss assumes exactly these. top_k must be
        # 0, not None, to be off: transformers fills None with 50.
        options = (
            {}
            if sampling.greedy
            else dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        )
        config = GenerationConfig(
            max_new_tokens=sampling.max_completion_length,
            do_sample=not sampling.greedy,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            output_scores=self.sampling_logprobs,  # the processed scores (after temperature, top-k, top-p)
            return_dict_in_generate=True,
            **options,
        )
        was_training = model.training
        model.eval()
        try:
            with autocast(self.bf16, device):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        except RuntimeError as e:
            if "probability tensor contains" not in str(e):  # torch.multinomial's words for NaN/inf probabilities
                raise
            raise FloatingPointError(
                "sampling: the model's next-token probabilities are NaN or inf (its weights or activations overflowed)"
            ) from None
        finally:
            model.train(was_training)
        eos_set = set(eos)
        completions, truncated = [], []
        for ids in out.sequences[:, width:].tolist():
            ids, cut = cut_at_eos(ids, eos_set)
            completions.append(ids)
            truncated.append(cut)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        logp = _sampled_logprobs(out.scores, out.sequences[:, width:], completions) if out.scores else None
        return Rows(rows, completions, truncated, texts, logp)


def _sampled_logprobs(scores, sampled: torch.Tensor, completions: list[list[int]]) -> list[list[float]]:
    """Per row, the log-prob of each kept token under the processed scores it was drawn from (fp32)."""
    # one step at a time: the scores of a step are [rows, vocab] (-inf where top-k / top-p cut), all steps
    # at once would be rows x new tokens x vocab
    chosen = torch.stack(
        [step.float().log_softmax(-1).gather(1, sampled[:, t, None])[:, 0] for t, step in enumerate(scores)], dim=1
    )
    return [row[: len(ids)] for row, ids in zip(chosen.tolist(), completions, strict=True)]


def adopt_model_eos(tokenizer, model) -> None:
    """A tokenizer without an EOS token (eos_token: null) takes the model's generation_config EOS: golden rows
    end with tokenizer.eos_token_id (encode_completion), and checkpoints save the tokenizer with it."""
    if tokenizer.eos_token_id is not None:
        return
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    first = config_eos[0] if isinstance(config_eos, list) and config_eos else config_eos
    if first is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(first))


def make_engine(
    vllm, model, tokenizer, model_path, *, bf16: bool, seed: int, max_model_len: int, rank: int = 0,
    trust_remote_code: bool = False, own_process: bool = False, log_dir=None,
):  # fmt: skip
    """The run's rollout engine: Hugging Face generate on the training model, or with vllm.use_vllm (a
    gcpo_fast.vllm_engine.VLLMConfig) a vLLM engine in this process (imported only then), seeded per rank and
    loaded from model_path (the checkpoint when resuming), so that its first weights are the trainer's; with
    vllm_mode server, a RemoteEngine of the generation server (rank 0 sends the weights). own_process (rounds
    sampled ahead of the trainer): Hugging Face generate in a server process of this rank's own (gcpo_fast.serve
    --engine hf, one thread on the CPU, its log in log_dir), so that generation and training run at once; a
    vLLM server then waits up to vllm_server_timeout for a server that restarts (its round is dropped, not the
    run). A tokenizer without an EOS token takes the model's (adopt_model_eos)."""
    adopt_model_eos(tokenizer, model)
    if not vllm.use_vllm and own_process:
        from gcpo_fast.remote_engine import launch_server

        options = ["--seed", str(seed + rank), "--max_model_len", str(max_model_len)]
        options += ["--trust_remote_code"] * trust_remote_code
        log = None if log_dir is None else str(Path(log_dir) / f"generation_server{f'-rank{rank}' if rank else ''}.log")
        return launch_server(
            model_path, tokenizer, engine="hf", timeout=vllm.vllm_server_timeout, server_args=options, log_path=log
        )
    if not vllm.use_vllm:
        return HFEngine(model, tokenizer, bf16=bf16)
    if vllm.vllm_mode == "server":  # every rank samples from the server; rank 0 sends it the weights
        from gcpo_fast.remote_engine import RemoteEngine

        return RemoteEngine(
            vllm.server_url, tokenizer, timeout=vllm.vllm_server_timeout, group_port=vllm.vllm_group_port,
            send_weights=rank == 0, api_key=vllm.server_api_key(),
            reconnect_timeout=vllm.vllm_server_timeout if own_process else 0.0,
        )  # fmt: skip
    from gcpo_fast.vllm_engine import VLLMEngine

    return VLLMEngine(
        model_path,
        tokenizer,
        seed=seed + rank,
        gpu_memory_utilization=vllm.vllm_gpu_memory_utilization,
        max_model_len=vllm.vllm_max_model_length or max_model_len,
        enable_sleep_mode=vllm.vllm_enable_sleep_mode,
        dtype="bfloat16" if bf16 and torch.cuda.is_available() else "float32",
        trust_remote_code=trust_remote_code,
    )
