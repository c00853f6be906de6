"""Per-device memory of a training run, estimated from the model's config before any weight loads.

    from transformers import AutoConfig
    from gcpo_fast.memory import plan_memory, fit_warning

    config = AutoConfig.from_pretrained("Qwen/Qwen2.5-7B")
    plan = plan_memory(config, tokens_per_micro_batch=64 * 384, parallelism="fsdp", world_size=8, bf16=True,
                       device="cuda", gradient_checkpointing=True, vllm_gpu_memory_utilization=0.3,
                       device_memory=80 * 2**30)
    print(plan.summary())                 # "memory per device (estimate): 41.2 GiB = weights 3.5 + ... of 80.0 GiB"
    warning = fit_warning(config, device_memory=80 * 2**30, **same_options)  # None when it fits, else one line

Inputs of plan_memory (all keyword, the run's options):
- model_config: a transformers config (AutoConfig; no weights). Parameters are counted exactly by building the
  model on the meta device; per-layer sizes read from the config (hidden_size, intermediate_size, heads, layers).
- tokens_per_micro_batch: tokens of one packed micro-batch (prompts + completions), e.g.
  per_device_train_batch_size * (max_prompt_length + max_completion_length) at worst; completion_tokens:
  those the loss scores, N (default: all T; at worst per_device_train_batch_size * max_completion_length).
- parallelism "ddp" | "fsdp", world_size (processes), cpu_offload (--fsdp_cpu_offload).
- bf16 and device ("cuda" | "cpu"): --bf16 on CUDA runs the fp32 model under bf16 autocast (DDP) or FSDP's
  bf16 mixed precision; elsewhere everything is fp32.
- gradient_checkpointing; reference_model (beta > 0: a frozen copy, bf16 under --bf16 on CUDA);
  vllm_gpu_memory_utilization (the colocated engine's share of the device; 0 without vLLM); device_memory
  (bytes; only for the summary's "of ..." and the warning).

The parts (bytes per device), P parameters, L layers, T tokens, h hidden, I intermediate, kv = key/value
heads x head_dim, a = activation element size (2 in bf16, 4 in fp32), S = sharding divisor (world_size under
FSDP, else 1):
- weights 4P/S (fp32 master; with CPU offload only what is gathered: see autocast_copies), gradients 4P/S,
  AdamW state 8P/S (exp_avg, exp_avg_sq); with CPU offload all three live on the host: 0 on the device.
- autocast_copies: DDP under bf16 autocast keeps a bf16 copy of every matmul weight for the forward, 2P;
  FSDP's mixed precision gathers two decoder layers at a time (the current and the prefetched) plus the
  root's embedding and head, in the compute dtype (2 bytes in bf16, 4 in fp32; unsharded fp32 params are
  not copied when not offloaded and fp32).
- activations, saved for the backward, per token per layer (counted from the tensors autograd keeps in a
  Qwen2/Llama decoder layer with flash-style attention, no T x T scores: the accounting of Korthikanti et
  al. 2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4.1, which gives 34h bytes
  per token per layer in fp16 for GPT's 4h MLP, redone for RMSNorm, RoPE, GQA and SwiGLU):
      A_layer = 4 * 4h (two RMSNorms: the fp32 input and normalised tensor each, kept in fp32 even under
                        autocast)
              + a * (3h          q/k/v and MLP projection inputs, o_proj input
                     + 2h + 2kv  RoPE (q, k and their rotate_half)
                     + 2h + 2kv  attention (q, k, v, output; the log-sum-exp is per head, negligible)
                     + 4I)       SwiGLU: gate, silu(gate), up, their product
  all layers: L * T * A_layer. With gradient checkpointing only each layer's input is kept (T * h * 4,
  the fp32 residual stream) plus one layer's A_layer recomputed during the backward.
  Plus the stream outside the layers: embeddings out and final norm (3 * T * h * 4), the fused op's
  inputs (the N completion states, N * h * a) and its own memory: a logit chunk and its softmax,
  2 * min(op_workspace, 4 * N * V), and on the CPU (torch backend: gradients in the forward) 4 * (V + N) * h.
- reference: the frozen reference model's weights (2P on CUDA under bf16, else 4P), unsharded.
- vllm: vllm_gpu_memory_utilization x device_memory (the engine reserves that share at start).
Not counted: the CUDA context and cuBLAS/NCCL workspaces (~0.5-1 GiB on a GPU), allocator fragmentation,
transient gradient buffers of one layer during the backward, the teacher model (--golden_model).
The CPU check of this estimate against measured peaks: benchmarks/bench_memory.py,
benchmarks/results/memory_estimate_cpu.md.
"""

from dataclasses import dataclass, fields

import torch

GIB = 2**30
DEFAULT_OP_WORKSPACE = 256 * 2**20  # the fused op's chunk workspace on the CPU (gcpo_fast.kernels)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device, by part; total() sums them."""

    weights: float
    gradients: float
    optimizer: float
    autocast_copies: float
    activations: float
    reference: float
    vllm: float
    device_memory: float | None = None

    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "device_memory")

    def summary(self) -> str:
        """One line: the total and its parts in GiB, and the device's memory when known."""
        parts = " + ".join(
            f"{f.name.replace('_', ' ')} {getattr(self, f.name) / GIB:.2f}"
            for f in fields(self)
            if f.name != "device_memory" and getattr(self, f.name) > 0
        )
        of = "" if self.device_memory is None else f" of {self.device_memory / GIB:.1f} GiB"
        return f"memory per device (estimate): {self.total() / GIB:.2f} GiB = {parts} GiB{of}"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model config: parameter counts and per-layer sizes."""

    params: int  # all trainable parameters, a tied embedding counted once
    layer_params: int  # one decoder layer's
    root_params: int  # outside the decoder layers: embeddings, final norm, head
    layers: int
    hidden: int
    intermediate: int
    kv: int  # key/value heads x head_dim
    vocab: int


def model_shape(model_config, trust_remote_code: bool = False) -> ModelShape:
    """Counts from the config: the model is built on the meta device (no memory, no weights); a model whose
    class is the folder's own code is built only with trust_remote_code."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    config = model_config.get_text_config()
    layers = model.get_decoder().layers
    params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in layers[0].parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(
        params=params,
        layer_params=layer_params,
        root_params=params - layer_params * len(layers),
        layers=len(layers),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        kv=kv_heads * head_dim,
        vocab=config.vocab_size,
    )


def activation_bytes_per_token_layer(shape: ModelShape, element: int) -> int:
    """A_layer of the module docstring: bytes autograd keeps per token in one decoder layer."""
    h, kv, i = shape.hidden, shape.kv, shape.intermediate
    return 4 * 4 * h + element * (3 * h + 2 * h + 2 * kv + 2 * h + 2 * kv + 4 * i)


def fused_op_bytes(shape: ModelShape, completion_tokens: int, op_workspace: float, device) -> float:
    """The fused op's own memory: a logit chunk and its softmax, [rows, V] fp32 each (rows <= N, a chunk at
    most the workspace) and, on the CPU's torch backend, which computes the gradients in the forward,
    dW [V, h] and dX [N, h] in fp32."""
    chunks = 2 * min(op_workspace, 4 * completion_tokens * shape.vocab)
    grads_in_forward = 4 * (shape.vocab + completion_tokens) * shape.hidden if torch.device(device).type == "cpu" else 0
    return chunks + grads_in_forward


def plan_memory(
    model_config,
    *,
    tokens_per_micro_batch: int,
    completion_tokens: int | None = None,
    parallelism: str = "ddp",
    world_size: int = 1,
    cpu_offload: bool = False,
    bf16: bool = True,
    device: str = "cuda",
    gradient_checkpointing: bool = False,
    reference_model: bool = False,
    vllm_gpu_memory_utilization: float = 0.0,
    device_memory: float | None = None,
    op_workspace: float = DEFAULT_OP_WORKSPACE,
    shape: ModelShape | None = None,
) -> MemoryPlan:
    """The per-device estimate for these options (see the module docstring for each input and part)."""
    if parallelism not in ("ddp", "fsdp"):
        raise ValueError(f"plan_memory: parallelism must be ddp or fsdp, got {parallelism!r}")
    shape = shape or model_shape(model_config)
    half = bf16 and torch.device(device).type == "cuda"
    element = 2 if half else 4
    fsdp = parallelism == "fsdp"
    shards = world_size if fsdp else 1
    offloaded = fsdp and cpu_offload
    p = shape.params
    if fsdp:  # two layers gathered (current + prefetched) and the root, in the compute dtype
        gathered = (2 * shape.layer_params + shape.root_params) * element
        autocast_copies = gathered if (half or offloaded or shards > 1) else 0
    else:
        autocast_copies = 2 * p if half else 0
    t, h = tokens_per_micro_batch, shape.hidden
    per_layer = activation_bytes_per_token_layer(shape, element)
    if gradient_checkpointing:
        layers = shape.layers * t * h * 4 + t * per_layer
    else:
        layers = shape.layers * t * per_layer
    n = t if completion_tokens is None else completion_tokens
    activations = layers + 3 * t * h * 4 + n * h * element + fused_op_bytes(shape, n, op_workspace, device)
    return MemoryPlan(
        weights=0 if offloaded else 4 * p / shards,
        gradients=0 if offloaded else 4 * p / shards,
        optimizer=0 if offloaded else 8 * p / shards,
        autocast_copies=autocast_copies,
        activations=activations,
        reference=(element * p) if reference_model else 0,
        vllm=vllm_gpu_memory_utilization * (device_memory or 0),
        device_memory=device_memory,
    )


# The options fit_warning tries, in this order: name on the command line, the change to plan_memory's inputs.
REMEDIES = (
    ("--gradient_checkpointing", dict(gradient_checkpointing=True)),
    ("--parallelism fsdp", dict(parallelism="fsdp")),
    ("--parallelism fsdp --fsdp_cpu_offload", dict(parallelism="fsdp", cpu_offload=True)),
    (
        "--parallelism fsdp --fsdp_cpu_offload --gradient_checkpointing",
        dict(parallelism="fsdp", cpu_offload=True, gradient_checkpointing=True),
    ),
)


def fit_warning(model_config, *, device_memory: float, **options) -> str | None:
    """None when plan_memory(model_config, **options) fits device_memory; else one line with the estimate
    and the options that would fit (and, if none does, the micro-batch tokens that would)."""
    shape = options.pop("shape", None) or model_shape(model_config)
    plan = plan_memory(model_config, shape=shape, device_memory=device_memory, **options)
    if plan.total() <= device_memory:
        return None
    fits = []
    for flag, change in REMEDIES:
        trial = {**options, **change}
        if all(options.get(k) == v for k, v in change.items()):
            continue  # already on
        if plan_memory(model_config, shape=shape, device_memory=device_memory, **trial).total() <= device_memory:
            fits.append(flag)
    tokens = _tokens_that_fit(model_config, shape, device_memory, options)
    if tokens:
        fits.append(f"at most {tokens} tokens per micro-batch (now {options['tokens_per_micro_batch']})")
    advice = "; would fit: " + ", or ".join(fits) if fits else "; no option tried fits (fewer parameters?)"
    return f"warning: {plan.summary()}: more than the device has{advice}"


def _tokens_that_fit(model_config, shape, device_memory, options) -> int | None:
    """The most micro-batch tokens (a power of two) that fit with the other options unchanged, if any."""
    tokens = options["tokens_per_micro_batch"]
    while tokens > 1:
        tokens //= 2
        trial = {**options, "tokens_per_micro_batch": tokens}
        if plan_memory(model_config, shape=shape, device_memory=device_memory, **trial).total() <= device_memory:
            return tokens
    return None
