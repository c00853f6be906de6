"""LoRA adapters through PEFT: the base frozen, low-rank adapters trained, rollouts from the adapted policy.

    python -m gcpo_fast.train --use_peft --lora_r 16 --lora_alpha 32           # TRL's option names
    python -m gcpo_fast.train --use_peft --lora_target_modules all-linear --lora_modules_to_save lm_head
    python -m gcpo_fast.eval --model runs/gcpo/checkpoint-300                  # an adapter checkpoint evaluates too
    python -m gcpo_fast.lora merge --adapter runs/gcpo/checkpoint-300 --out merged/   # a full Hugging Face folder
    python -m gcpo_fast.lora merge --adapter runs/gcpo/checkpoint-300 --out merged/ --overwrite   # replace it

Each adapted linear layer computes y = W x + (alpha / r) B A x (alpha / sqrt(r) with --use_rslora; DoRA with
--use_dora), W [out, in] frozen, A [r, in] and B [out, r] trained in fp32 (B starts at 0, so step 0 is the base
model). Everything else is frozen, the lm_head included unless named in --lora_modules_to_save, so the fused op
gets a weight that needs no gradient and skips its dW GEMM (2NVd of its 8NVd). The lm_head itself is no LoRA
target: the fused op reads its weight, never the adapter's output, so an adapter there would never train (it is
refused; --lora_modules_to_save lm_head trains it whole). PEFT is an optional dependency (`pip install -e
".[lora]"`), imported only when --use_peft is given.

A checkpoint holds the adapter in PEFT's layout (adapter_config.json, adapter_model.safetensors: what
`PeftModel.from_pretrained(base, folder)` loads) beside the trainer's state; the base model is --model. A rollout
engine with weights of its own (vLLM) gets the merged weights W + delta under the base model's parameter names
(`merged_named_parameters`), computed layer by layer (PEFT's merge, the copy, then the base weight restored
bit for bit: the trained base never drifts through merge/unmerge rounding).

`lora merge` writes a new or empty folder, replaces the model in an existing one only with --overwrite, never
writes into the adapter's base or the adapter, and turns what PEFT raises on a damaged adapter (weights missing
or cut short, a config it cannot read, an adapter of other shapes than its base) into one line (load_adapted).
"""

import argparse
import json
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from gcpo_fast.errors import ConfigError, require
from gcpo_fast.options import check_options, option
from gcpo_fast.run.checkpoint import ADAPTER_CONFIG

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PeftOptions:
    """LoRA adapters (PEFT), with TRL's ModelConfig names."""

    _argument_group_name = "lora"

    use_peft: bool = option(False, "train LoRA adapters (PEFT) on a frozen base instead of every weight")
    lora_r: int = option(16, "LoRA rank r")
    lora_alpha: int = option(32, "LoRA alpha: the adapter's output is scaled by alpha / r")
    lora_dropout: float = option(0.05, "dropout on the adapters' input")
    lora_target_modules: list[str] | None = option(
        None,
        "linear modules to adapt, by name, or all-linear (default: the attention and MLP projections the model has, "
        f"of {' '.join(DEFAULT_TARGETS)})",
    )
    lora_modules_to_save: list[str] | None = option(
        None, "modules trained whole beside the adapters (e.g. lm_head; default: none, the lm_head stays frozen)"
    )
    use_rslora: bool = option(False, "rank-stabilised LoRA: scale by alpha / sqrt(r)")
    use_dora: bool = option(False, "DoRA: weight-decomposed adapters (magnitude and direction)")

    def __post_init__(self):
        check_options(self)
        require(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        require(
            self.lora_alpha > 0, f"lora_alpha must be > 0 (the adapter's scale is alpha / r), got {self.lora_alpha}"
        )
        require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.use_peft:
            import_peft()


def import_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError('--use_peft needs PEFT: pip install -e ".[lora]"') from None
    return peft


def is_adapter_folder(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path) -> str:
    """The base model folder an adapter folder was trained on (its adapter_config.json)."""
    try:
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"adapter folder {path}: cannot read the base model from {ADAPTER_CONFIG}: {e}") from None
    if not base:
        raise ValueError(f"adapter folder {path}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def linear_module_names(model) -> list[str]:
    """The distinct last name components of the model's linear layers (what --lora_target_modules takes)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def target_modules(model, options: PeftOptions) -> list[str] | str:
    """The modules to adapt: the given names (each must name a linear layer), all-linear, or the default set."""
    linear = linear_module_names(model)
    given = options.lora_target_modules
    if given in (["all-linear"], ["all_linear"]):
        return "all-linear"
    if given is None:
        found = [name for name in DEFAULT_TARGETS if name in linear]
        require(
            found,
            f"--use_peft: the model has none of the default lora_target_modules ({' '.join(DEFAULT_TARGETS)}); "
            f"name some with --lora_target_modules; its linear modules: {' '.join(linear)}",
        )
        return found
    unknown = [name for name in given if name not in linear]
    require(
        not unknown,
        f"lora_target_modules {' '.join(unknown)}: no such linear module; the model's linear modules: "
        f"{' '.join(linear)} (or all-linear)",
    )
    head = output_layer_name(model)
    require(
        head not in given,
        f"lora_target_modules {head}: the fused loss reads the output layer's weight itself, so an adapter there "
        f"would never train; train the layer whole with --lora_modules_to_save {head}",
    )
    return list(given)


def output_layer_name(model) -> str | None:
    """The last name component of the model's output layer (lm_head), None if it has none."""
    head = model.get_output_embeddings()
    return next((name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is head), None)


def check_modules_to_save(model, options: PeftOptions) -> None:
    """Each of --lora_modules_to_save names a module of the model (as PEFT matches it: the whole name or its end):
    PEFT ignores a name that matches nothing."""
    names = [name for name, _ in model.named_modules() if name]
    unknown = [
        given
        for given in options.lora_modules_to_save or []
        if not any(n == given or n.endswith("." + given) for n in names)
    ]
    children = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
    require(
        not unknown,
        f"lora_modules_to_save {' '.join(unknown)}: no such module; the model's modules: {' '.join(children)}",
    )


def attach(model, options: PeftOptions, *, base_path, adapter=None, seed: int = 0):
    """The model with LoRA adapters (a peft.PeftModel) when options.use_peft, else the model unchanged. adapter: an
    adapter folder to continue from (a checkpoint), else fresh adapters (B = 0). base_path is recorded in the
    adapter's config, so that the folder names its base. The fresh adapters' A matrices are drawn from `seed`
    alone, the same on every rank (FSDP shards each rank's own copy, it broadcasts nothing) and for any number of
    ranks; the global RNG is left as it was."""
    if not options.use_peft:
        return model
    peft = import_peft()
    folder = Path(base_path)
    model.config.name_or_path = str(folder.resolve()) if folder.exists() else str(base_path)
    if adapter is not None:
        adapted = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        check_adapter_complete(adapted, adapter)
        return adapted
    check_modules_to_save(model, options)
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=target_modules(model, options),
        modules_to_save=options.lora_modules_to_save,
        use_rslora=options.use_rslora,
        use_dora=options.use_dora,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # autocast_adapter_dtype: adapters in fp32 when the base is bf16
        return peft.get_peft_model(model, config, autocast_adapter_dtype=True)


def base_dtype(options: PeftOptions, bf16: bool, device) -> torch.dtype:
    """The frozen base's dtype: bf16 on CUDA with --bf16 (no gradients or AdamW state need fp32 there), else fp32."""
    return torch.bfloat16 if options.use_peft and bf16 and torch.device(device).type == "cuda" else torch.float32


def is_peft_model(model) -> bool:
    with suppress(ImportError):
        from peft import PeftModel

        return isinstance(model, PeftModel)
    return False


@torch.no_grad()
def merged_named_parameters(model):
    """(name, tensor) pairs of the adapted model as one plain model: each adapted layer's merged weight
    W + delta, the active copy of each module to save, every other parameter as it is, under the base model's
    Hugging Face names (model.layers.0.self_attn.q_proj.weight), one tensor at a time. The base is left bit for
    bit as it was. A model without adapters gives its own named_parameters()."""
    if not is_peft_model(model):
        yield from model.named_parameters()
        return
    yield from _walk(model.get_base_model(), "", set())


def _walk(module, prefix: str, seen: set):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        active = (
            module.original_module if module.disable_adapters else module.modules_to_save[module.active_adapters[0]]
        )
        yield from _walk(active, prefix, seen)
        return
    if isinstance(module, BaseTunerLayer):
        base = module.get_base_layer()
        yield f"{prefix}weight", _merged_weight(module, base)
        if getattr(base, "bias", None) is not None:
            yield f"{prefix}bias", base.bias
        return
    for name, param in module.named_parameters(recurse=False):
        if id(param) not in seen:  # a tied weight once, under its first name (as named_parameters does)
            seen.add(id(param))
            yield f"{prefix}{name}", param
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", seen)


def _merged_weight(layer, base) -> torch.Tensor:
    """base.weight with the layer's active adapters merged in, as a new tensor; base.weight is restored exactly."""
    original = base.weight.detach().clone()
    layer.merge()
    merged = base.weight.detach().clone()
    layer.unmerge()
    base.weight.data.copy_(original)
    return merged


# ---- python -m gcpo_fast.lora merge ---------------------------------------------------------------------------


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def load_adapted(adapter, *, device="cpu", dtype=torch.float32, trust_remote_code: bool = False):
    """(PeftModel, tokenizer) of an adapter folder: its base model (adapter_config.json) with the adapter on it.
    ValueError (one line) for a folder PEFT cannot load on that base: no adapter weights (PEFT would take the
    folder for a hub id), weights cut short or lacking tensors (PEFT would warn and go on with fresh ones), a
    config PEFT cannot read, an adapter of other shapes."""
    from gcpo_fast.models.loading import load_causal_lm, load_tokenizer

    peft = import_peft()
    if not any((Path(adapter) / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ValueError(f"adapter folder {adapter}: no adapter weights (none of {', '.join(ADAPTER_WEIGHTS)})")
    base_path = adapter_base(adapter)
    base = load_causal_lm(base_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter))
        check_adapter_complete(model, adapter)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"adapter folder {adapter}: cannot load it on its base {base_path}: {_gist(e)}") from None
    return model, load_tokenizer(base_path, trust_remote_code=trust_remote_code)


def check_adapter_complete(model, adapter) -> None:
    """ValueError unless the adapter folder's weights hold every tensor of the adapter built on the model:
    PEFT only warns about missing ones and keeps them as initialised (lora_B = 0: the base, unadapted)."""
    peft = import_peft()
    saved = set(peft.utils.load_peft_weights(str(adapter), device="cpu"))
    missing = sorted(set(peft.get_peft_model_state_dict(model)) - saved)
    if missing:
        raise ValueError(f"its weights lack {len(missing)} of the adapter's tensors (e.g. {missing[0]})")


def _gist(error: Exception, limit: int = 300) -> str:
    """One line of a loading error: torch's first size mismatch rather than its header line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = next((line for line in lines if line.startswith("size mismatch")), lines[0])
    return line if len(line) <= limit else line[: limit - 3] + "..."


def merge(adapter, out, *, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write the base model with the adapter merged in as a Hugging Face folder (weights, config, tokenizer).
    An existing folder is replaced only with overwrite (its weight files first, so that no stale shard stays),
    and never when it is the adapter's base or the adapter itself."""
    if not is_adapter_folder(adapter):
        raise ValueError(f"--adapter {adapter}: not an adapter folder (no {ADAPTER_CONFIG})")
    out = Path(out)
    check_merge_target(adapter, out, overwrite)
    model, tokenizer = load_adapted(adapter, trust_remote_code=trust_remote_code)
    kind = model.peft_config[model.active_adapter].peft_type
    if kind != "LORA":  # prompt tuning and its kind add no weights to merge
        raise ValueError(f"adapter folder {adapter}: a {kind} adapter; only LoRA adapters merge into the weights")
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    # files of what the folder held that would mix with the merged model: stale shards, an adapter's config
    for stale in [*out.glob("*.safetensors"), *out.glob("*.bin"), *out.glob("*.index.json"), *out.glob(ADAPTER_CONFIG)]:
        stale.unlink()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def check_merge_target(adapter, out: Path, overwrite: bool) -> None:
    """ValueError unless `out` may receive the merged model: absent or an empty folder, or, with overwrite, a
    folder that is neither the adapter's base (its weights would be replaced by the merged ones) nor the adapter."""
    from gcpo_fast.models.loading import check_model_folder

    base = check_model_folder(adapter_base(adapter))
    for folder, what in ((base, "the adapter's base model"), (Path(adapter), "the adapter folder")):
        if out.resolve() == folder.resolve():
            raise ValueError(f"--out {out} is {what}: write the merged model to another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty: pass --overwrite to replace the model in it")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gcpo_fast.lora", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "merge", help="write the base model with the adapter merged in (a Hugging Face folder)"
    )
    command.add_argument("--adapter", required=True, help="adapter folder (a --use_peft checkpoint)")
    command.add_argument("--out", required=True, help="folder to write the merged model to")
    command.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model in an existing --out folder (never the adapter's base or the adapter)",
    )
    command.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = merge(args.adapter, args.out, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"python -m gcpo_fast.lora: error: {e}")
    except OSError as e:  # writing --out: a read-only place, a full disk, a path through a file
        sys.exit(f"python -m gcpo_fast.lora: error: --out {args.out}: cannot write there ({e.strerror or e})")
    print(f"merged model written to {out}")
