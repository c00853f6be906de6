"""The one place that knows every rollout engine: a run's options in, an engine out.

    from gcpo_fast.engines.factory import make_engine
    engine = make_engine(cfg.vllm, model, tokenizer, path, bf16=True, seed=0, max_model_len=384)
    teacher = make_teacher_engine(cfg.vllm, "~/models/teacher", tokenizer, device="cuda", bf16=True, seed=0,
                                  max_model_len=512)      # golden answers' teacher: frozen, never synced

vLLM and the server client are imported only when a run asks for them.
"""

from pathlib import Path

import torch

from gcpo_fast.engines.base import adopt_model_eos
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.models.loading import frozen_dtype, load_causal_lm


def make_engine(
    vllm, model, tokenizer, model_path, *, bf16: bool, seed: int, max_model_len: int, rank: int = 0,
    trust_remote_code: bool = False, own_process: bool = False, log_dir=None,
):  # fmt: skip
    """The run's rollout engine: Hugging Face generate on the training model, or with vllm.use_vllm (a
    gcpo_fast.engines.vllm_engine.VLLMConfig) a vLLM engine in this process (imported only then), seeded per rank and
    loaded from model_path (the checkpoint when resuming), so that its first weights are the trainer's; with
    vllm_mode server, a RemoteEngine of the generation server (rank 0 sends the weights). own_process (rounds
    sampled ahead of the trainer): Hugging Face generate in a server process of this rank's own (gcpo_fast.serve
    --engine hf, one thread on the CPU, its log in log_dir), so that generation and training run at once; a
    vLLM server then waits up to vllm_server_timeout for a server that restarts (its round is dropped, not the
    run). A tokenizer without an EOS token takes the model's (adopt_model_eos)."""
    adopt_model_eos(tokenizer, model)
    if not vllm.use_vllm and own_process:
        from gcpo_fast.engines.remote import launch_server

        options = ["--seed", str(seed + rank), "--max_model_len", str(max_model_len)]
        options += ["--trust_remote_code"] * trust_remote_code
        log = None if log_dir is None else str(Path(log_dir) / f"generation_server{f'-rank{rank}' if rank else ''}.log")
        return launch_server(
            model_path, tokenizer, engine="hf", timeout=vllm.vllm_server_timeout, server_args=options, log_path=log
        )
    if not vllm.use_vllm:
        return HFEngine(model, tokenizer, bf16=bf16)
    if vllm.vllm_mode == "server":  # every rank samples from the server; rank 0 sends it the weights
        from gcpo_fast.engines.remote import RemoteEngine

        return RemoteEngine(
            vllm.server_url, tokenizer, timeout=vllm.vllm_server_timeout, group_port=vllm.vllm_group_port,
            send_weights=rank == 0, api_key=vllm.server_api_key(),
            reconnect_timeout=vllm.vllm_server_timeout if own_process else 0.0,
        )  # fmt: skip
    from gcpo_fast.engines.vllm_engine import VLLMEngine

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


def make_teacher_engine(
    vllm, folder, tokenizer, *, device, bf16: bool, seed: int, max_model_len: int, trust_remote_code: bool = False
):
    """The engine of a golden-answer teacher (gcpo_fast/golden/teacher.py), whose weights never change: with the
    colocated vLLM engine a second vLLM engine in this process, else Hugging Face generate on the teacher loaded
    frozen (bf16 on CUDA under --bf16)."""
    if vllm.use_vllm and vllm.vllm_mode == "colocate":
        from gcpo_fast.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            folder, tokenizer, seed=seed, dtype="auto", gpu_memory_utilization=vllm.vllm_gpu_memory_utilization,
            max_model_len=max_model_len, trust_remote_code=trust_remote_code,
        )  # fmt: skip
    model = load_causal_lm(folder, device=device, dtype=frozen_dtype(bf16, device), trust_remote_code=trust_remote_code)
    return HFEngine(model.eval().requires_grad_(False), tokenizer, bf16=bf16)
