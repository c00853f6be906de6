"""Per-device memory of a training run, estimated from the model's config before any weight loads.

    from transformers import AutoConfig
    from gcpo_fast.models.memory import plan_memory, fit_warning

    config = AutoConfig.from_pretrained("Qwen/Qwen2.5-7B")
    plan = plan_memory(config, tokens_per_micro_batch=64 * 384, parallelism="fsdp", world_size=8, bf16=True,
                       device="cuda", gradient_checkpointing=True, vllm_gpu_memory_utilization=0.3,
                       device_memory=80 * 2**30)
    print(plan.summary())                 # "memory per device (estimate): 41.2 GiB = weights 3.5 + ... of 80.0 GiB"
    warning = fit_warning(config, device_memory=80 * 2**30, **same_options)  # None when it fits, else one line
    plan_memory(config, lora=PeftOptions(use_peft=True, lora_r=16), ...)      # LoRA (gcpo_fast.models.lora.PeftOptions)
    python -m benchmarks.bench_memory --plan_7b     # Qwen2.5-7B on one 80 GB GPU, LoRA r=16 and full, printed

Inputs of plan_memory (all keyword, the run's options):
- model_config: a transformers config (AutoConfig; no weights). Parameters are counted exactly by building the
  model on the meta device; per-layer sizes read from the config (hidden_size, intermediate_size, heads, layers).
- tokens_per_micro_batch: tokens of one packed micro-batch (prompts + completions), e.g.
  per_device_train_batch_size * (max_prompt_length + max_completion_length) at worst; completion_tokens:
  those the loss scores, N (default: all T; at worst per_device_train_batch_size * max_completion_length).
- parallelism "ddp" | "fsdp", world_size (processes), cpu_offload (--fsdp_cpu_offload).
- bf16 and device ("cuda" | "cpu"): --bf16 on CUDA runs the fp32 model under bf16 autocast (DDP) or FSDP's
  bf16 mixed precision; elsewhere everything is fp32.
- repeated_kv: the attention keeps K/V repeated to every query head (gcpo_fast.attention.repeats_kv).
- gradient_checkpointing; reference_model (beta > 0: a frozen copy, bf16 under --bf16 on CUDA);
  vllm_gpu_memory_utilization (the colocated engine's share of the device; 0 without vLLM); device_memory
  (bytes; only for the summary's "of ..." and the warning); lora: the run's PeftOptions (None: full
  fine-tuning).

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
                     + 2h + 2kv  attention (q, k, v, output; the log-sum-exp is per head, negligible);
                                 2h + 2h where the attention repeats k and v to every query head
                                 (repeated_kv: packed_sdpa, and packed_varlen on a torch whose varlen_attn
                                 takes no grouped K/V: gcpo_fast.attention.repeats_kv)
                     + 4I)       SwiGLU: gate, silu(gate), up, their product
  all layers: L * T * A_layer. With gradient checkpointing only each layer's input is kept (T * h * 4,
  the fp32 residual stream) plus one layer's A_layer recomputed during the backward.
  Plus the stream outside the layers: embeddings out and final norm (3 * T * h * 4), the fused op's
  inputs (the N completion states, N * h * a) and its own memory: a logit chunk and its softmax,
  2 * min(op_workspace, 4 * N * V), and on the CPU (torch backend: gradients in the forward) 4 * (V + N) * h.
- reference: the frozen reference model's weights (2P on CUDA under bf16, else 4P), unsharded.
- vllm: vllm_gpu_memory_utilization x device_memory (the engine reserves that share at start).
With LoRA (lora.use_peft), from PEFT's adapters attached to the model on the meta device (adapter_shape; exact:
tests/test_memory_lora.py checks the count against PEFT's own), A trainable parameters (r * (in + out) per adapted
linear, DoRA's magnitudes, the copies of --lora_modules_to_save):
- weights: the frozen base in its dtype (gcpo_fast.models.lora.base_dtype: 2P bf16 on CUDA under --bf16, else 4P),
  the adapters in fp32 (4A), and a module to save twice (the original and PEFT's trained copy, base dtype);
  gradients and AdamW state for the A trainable parameters only (4A and 8A in fp32).
- autocast_copies: under DDP only the adapters' bf16 copies (2 x lora_A and lora_B parameters): the base is
  already bf16; FSDP gathers as above.
- activations: A_layer as above (a frozen matmul keeps no input for a weight gradient, but the adapter on it
  keeps that input or a copy of it, so the term stays), plus per adapted linear per token: lora_B's input
  (a * r) and, with --lora_dropout > 0, lora_A's input, the dropped copy (a * in), and its mask (1 byte * in);
  for Qwen2.5-7B's 7 projections at the default dropout that is 3 * (6h + I) bytes per token per layer, ~46% of
  A_layer, so it matters without gradient checkpointing. The frozen lm_head: no dW in the fused op (on the CPU
  the torch backend's dW [V, h] goes).
Not counted: the CUDA context and cuBLAS/NCCL workspaces (~0.5-1 GiB on a GPU), allocator fragmentation,
transient gradient buffers of one layer during the backward, the teacher model (--golden_model).
The CPU check of this estimate against measured peaks: benchmarks/bench_memory.py,
benchmarks/results/memory_estimate_cpu.md.
"""

import copy
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

    def summary(self, what: str = "estimate") -> str:
        """One line: the total and its parts in GiB, and the device's memory when known; `what` says which
        estimate it is (the trainer's: the worst case at its budgets, or at the lengths a round had)."""
        parts = " + ".join(
            f"{f.name.replace('_', ' ')} {getattr(self, f.name) / GIB:.2f}"
            for f in fields(self)
            if f.name != "device_memory" and getattr(self, f.name) > 0
        )
        of = "" if self.device_memory is None else f" of {self.device_memory / GIB:.1f} GiB"
        return f"memory per device ({what}): {self.total() / GIB:.2f} GiB = {parts} GiB{of}"


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


@dataclass(frozen=True)
class AdapterShape:
    """What the estimate needs from the model with its LoRA adapters (PEFT attached on the meta device)."""

    weight_bytes: int  # every parameter: the frozen base in its dtype, the adapters, the copies of modules to save
    trainable: int  # parameters that train: lora_A, lora_B (DoRA's magnitudes), modules to save
    trainable_bytes: int  # their bytes: adapters fp32, a module to save in the base's dtype (PEFT copies it)
    adapter_matmul_params: int  # lora_A and lora_B: what bf16 autocast copies for the forward
    layer_params: int  # one decoder layer's, adapters included
    root_params: int
    layer_inputs: int  # sum of in_features over one decoder layer's adapted linears
    layer_ranks: int  # sum of r over them
    dropout: bool  # lora_dropout > 0
    head_trainable: bool  # the lm_head is a module to save (the fused op computes dW)


def adapter_shape(model_config, options, dtype: torch.dtype, trust_remote_code: bool = False) -> AdapterShape:
    """Counts of the model with PEFT's adapters (gcpo_fast.models.lora.attach, options: PeftOptions), built on the meta
    device with the frozen base in `dtype` (gcpo_fast.models.lora.base_dtype): exactly what PEFT would train."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from gcpo_fast.models.lora import attach

    config = copy.deepcopy(model_config)  # attach records the base's name in the config
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model = attach(base, options, base_path=config.name_or_path or "meta")
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    layers = base.get_decoder().layers
    adapted = [m for m in layers[0].modules() if isinstance(m, LoraLayer)]
    layer_params = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in params)
    return AdapterShape(
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        adapter_matmul_params=sum(
            p.numel() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name
        ),
        layer_params=layer_params,
        root_params=total - layer_params * len(layers),
        layer_inputs=sum(m.in_features for m in adapted),
        layer_ranks=sum(m.r[name] for m in adapted for name in m.r),
        dropout=options.lora_dropout > 0,
        head_trainable=any(p.requires_grad for p in base.get_output_embeddings().parameters()),
    )


def adapter_activation_bytes_per_token_layer(adapters: AdapterShape, element: int) -> int:
    """What the adapters add to A_layer per token: each adapted linear keeps lora_B's input [T, r] and, with
    dropout, lora_A's input (the dropped copy, [T, in]) and the dropout mask (1 byte per element)."""
    return element * adapters.layer_ranks + (element + 1) * adapters.layer_inputs * adapters.dropout


def activation_bytes_per_token_layer(shape: ModelShape, element: int, repeated_kv: bool = False) -> int:
    """A_layer of the module docstring: bytes autograd keeps per token in one decoder layer; with repeated_kv the
    attention keeps key and value repeated to every query head (h each instead of kv)."""
    h, kv, i = shape.hidden, shape.kv, shape.intermediate
    attention_kv = 2 * h if repeated_kv else 2 * kv
    return 4 * 4 * h + element * (3 * h + 2 * h + 2 * kv + 2 * h + attention_kv + 4 * i)


def fused_op_bytes(
    shape: ModelShape, completion_tokens: int, op_workspace: float, device, head_trainable: bool = True
) -> float:
    """The fused op's own memory: a logit chunk and its softmax, [rows, V] fp32 each (rows <= N, a chunk at
    most the workspace) and, on the CPU's torch backend, which computes the gradients in the forward,
    dX [N, h] and, when the head trains, dW [V, h], in fp32."""
    chunks = 2 * min(op_workspace, 4 * completion_tokens * shape.vocab)
    rows = (shape.vocab if head_trainable else 0) + completion_tokens
    grads_in_forward = 4 * rows * shape.hidden if torch.device(device).type == "cpu" else 0
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
    lora=None,
    shape: ModelShape | None = None,
    adapters: AdapterShape | None = None,
    repeated_kv: bool = False,
) -> MemoryPlan:
    """The per-device estimate for these options (see the module docstring for each input and part); lora: the
    run's gcpo_fast.models.lora.PeftOptions (LoRA when lora.use_peft), None for full fine-tuning."""
    if parallelism not in ("ddp", "fsdp"):
        raise ValueError(f"plan_memory: parallelism must be ddp or fsdp, got {parallelism!r}")
    shape = shape or model_shape(model_config)
    half = bf16 and torch.device(device).type == "cuda"
    element = 2 if half else 4
    if lora is not None and lora.use_peft and adapters is None:
        from gcpo_fast.models.lora import base_dtype

        adapters = adapter_shape(model_config, lora, base_dtype(lora, bf16, device))
    fsdp = parallelism == "fsdp"
    shards = world_size if fsdp else 1
    offloaded = fsdp and cpu_offload
    p = shape.params
    layer_params, root_params = (
        (adapters.layer_params, adapters.root_params) if adapters else (shape.layer_params, shape.root_params)
    )
    if fsdp:  # two layers gathered (current + prefetched) and the root, in the compute dtype
        gathered = (2 * layer_params + root_params) * element
        autocast_copies = gathered if (half or offloaded or shards > 1) else 0
    elif adapters:  # the frozen base is already in the compute dtype; autocast copies only the adapters
        autocast_copies = 2 * adapters.adapter_matmul_params if half else 0
    else:
        autocast_copies = 2 * p if half else 0
    t, h = tokens_per_micro_batch, shape.hidden
    per_layer = activation_bytes_per_token_layer(shape, element, repeated_kv)
    if adapters:
        per_layer += adapter_activation_bytes_per_token_layer(adapters, element)
    if gradient_checkpointing:
        layers = shape.layers * t * h * 4 + t * per_layer
    else:
        layers = shape.layers * t * per_layer
    n = t if completion_tokens is None else completion_tokens
    head_trainable = adapters.head_trainable if adapters else True
    op = fused_op_bytes(shape, n, op_workspace, device, head_trainable)
    activations = layers + 3 * t * h * 4 + n * h * element + op
    weight_bytes, trainable_bytes = (adapters.weight_bytes, adapters.trainable_bytes) if adapters else (4 * p, 4 * p)
    return MemoryPlan(
        weights=0 if offloaded else weight_bytes / shards,
        gradients=0 if offloaded else trainable_bytes / shards,
        optimizer=0 if offloaded else 2 * trainable_bytes / shards,
        autocast_copies=autocast_copies,
        activations=activations,
        reference=(element * p) if reference_model else 0,
        vllm=vllm_gpu_memory_utilization * (device_memory or 0),
        device_memory=device_memory,
    )


def worst_case_rows(cfg) -> int:
    """Rows of a micro-batch at most: per_device_train_batch_size completions, and with golden answers appended at
    most one golden row per group of num_generations on top (a round's rows are spread evenly over its
    micro-batches). cfg: a gcpo_fast.config.TrainConfig."""
    rows, g = cfg.batch.per_device_train_batch_size, cfg.rollout.num_generations
    return -(-rows * (g + 1) // g) if cfg.golden.golden_answer == "append" else rows


def run_options(cfg, *, world_size: int, device, repeated_kv: bool, device_memory: float | None = None) -> dict:
    """plan_memory's inputs (less the model) for a run of the trainer's config cfg (gcpo_fast.config.TrainConfig)
    at its worst case: worst_case_rows rows, each at max_prompt_length + max_completion_length."""
    rows, r = worst_case_rows(cfg), cfg.rollout
    cuda = torch.device(device).type == "cuda"
    colocated = cfg.vllm.use_vllm and cfg.vllm.vllm_mode == "colocate"  # a server's memory is not this device's
    return dict(
        tokens_per_micro_batch=rows * (r.max_prompt_length + r.max_completion_length),
        completion_tokens=rows * r.max_completion_length,
        parallelism=cfg.parallel.parallelism,
        world_size=world_size,
        cpu_offload=cfg.parallel.fsdp_cpu_offload,
        bf16=cfg.model.bf16,
        device=torch.device(device).type,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        reference_model=cfg.method.beta > 0,
        vllm_gpu_memory_utilization=cfg.vllm.vllm_gpu_memory_utilization if colocated and cuda else 0.0,
        lora=cfg.lora if cfg.lora.use_peft else None,
        repeated_kv=repeated_kv,
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
    lora = options.get("lora")
    if lora is not None and lora.use_peft and options.get("adapters") is None:  # counted once, not per trial
        from gcpo_fast.models.lora import base_dtype

        dtype = base_dtype(lora, options.get("bf16", True), options.get("device", "cuda"))
        options["adapters"] = adapter_shape(model_config, lora, dtype)
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
