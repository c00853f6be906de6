"""Loading the policy (a causal decoder) and its tokenizer from a local folder, refusing what cannot train.

    from gcpo_fast.models.loading import check_model_folder, frozen_dtype, load_causal_lm, load_tokenizer

    folder = check_model_folder("runs/gcpo/checkpoint-300")      # one-line ValueError before anything loads
    tokenizer = load_tokenizer(folder)
    model = load_causal_lm(folder, device="cuda", attn_implementation="sdpa", gradient_checkpointing=True)

Nothing is downloaded at run time: a model is a local Hugging Face folder, or the hub id of a model already
in the local Hugging Face cache (`hf download Qwen/Qwen2.5-0.5B` puts it there). Each of these is refused
with a one-line ValueError naming the path, before any weights load:
- a path that does not exist (and is not a cached hub id), a file, an empty folder;
- no config.json, a config.json that is not JSON or names no model_type transformers knows;
- no weights (model.safetensors, pytorch_model.bin or their sharded index); no tokenizer files;
- a model that is not a causal decoder: an encoder-decoder (T5, BART; config.is_encoder_decoder), a
  model type with no causal-LM class, or an encoder (BERT, RoBERTa, ...: transformers also gives the type a
  masked-LM head) whose config does not set is_decoder, without which its causal-LM class (BertLMHeadModel)
  attends to the whole sequence, future tokens included.
A folder whose config.json maps to its own Python files (auto_map) for a model_type transformers does not
know is refused unless trust_remote_code is passed (`--trust_remote_code`, as in TRL): transformers would
otherwise ask on stdin, and `yes |` would run a stranger's code.
When loading: weights transformers cannot read (a truncated file), parameters the folder has no weights
for (they would be random), and a tokenizer without a vocabulary (transformers builds an empty one from a
folder without tokenizer files) and a tokenizer whose ids reach past the model's vocab_size (check_vocabulary)
are refused too.
"""

import json
import pickle
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from gcpo_fast.options import check_options, option
from gcpo_fast.run.checkpoint import ADAPTER_CONFIG

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "assets" / "default_model")
# the same model, its warm start given python-tool solutions at levels 3 and 7 (make_default_model --tool-levels 3 7):
# the model of the tool demo on level 8 (docs/results.md, "Tools on level 8")
TOOL_MODEL = str(Path(__file__).resolve().parents[1] / "assets" / "tool_model")


@dataclass
class ModelConfig:
    """The policy: where it is and how it runs."""

    _argument_group_name = "model"

    model: str = option(
        DEFAULT_MODEL,
        "local Hugging Face causal LM folder, or the id of a model in the local hub cache "
        "(default: gcpo_fast/assets/default_model)",
    )
    bf16: bool = option(True, "bf16 autocast on CUDA (weights and optimizer stay fp32); ignored on the CPU")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward to save memory")
    attn_implementation: str | None = option(
        None,
        "packed attention backend: flash_attention_2 (flash-attn installed), packed_varlen (torch's varlen_attn), "
        "packed_sdpa (SDPA row by row, any device) (default: the first of these that runs here; "
        "gcpo_fast/models/attention.py)",
    )
    trust_remote_code: bool = option(
        False, "run the Python files a model folder maps to in its config.json (auto_map): a stranger's code"
    )

    def __post_init__(self):
        check_options(self)

    @property
    def is_shipped(self) -> bool:
        """Whether this is one of the models that ship in the repository (however its path is written)."""
        return str(Path(self.model).resolve()) in (DEFAULT_MODEL, TOOL_MODEL)


def autocast(bf16: bool, device: torch.device):
    """bf16 autocast on CUDA when asked (weights and optimizer state stay fp32); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext()


WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# tokenizers' own file, the config every saved tokenizer has, and the vocabulary files of slow tokenizers
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_hub_id(path: str) -> bool:
    try:
        validate_repo_id(path)
        return True
    except HFValidationError:
        return False


def _cached_hub_model(path: str) -> Path | None:
    """The local snapshot folder of hub id `path` in the Hugging Face cache; None if it is not a hub id or
    not cached. Never touches the network."""
    if not _is_hub_id(path):
        return None
    try:
        return Path(snapshot_download(path, local_files_only=True))
    except OSError:  # LocalEntryNotFoundError: not in the cache
        return None


def _missing(path: str) -> str:
    if Path(path).resolve() == Path(DEFAULT_MODEL):
        return (
            f"the shipped model is missing from {DEFAULT_MODEL}: build it with `python -m gcpo_fast.make_default_model`"
        )
    if not _is_hub_id(path):
        return f"model folder {path} does not exist"
    return (
        f"model folder {path} does not exist, nor is {path} a model in the local Hugging Face cache (nothing is "
        f"downloaded at run time: `hf download {path}` first, or pass the model's folder)"
    )


def check_model_folder(path, *, trust_remote_code: bool = False) -> Path:
    """The folder of a loadable causal decoder at `path` (a folder, or a hub id in the local cache);
    ValueError naming the path and the problem otherwise. Reads config.json only, no weights; the folder's
    own Python code (auto_map) runs only with trust_remote_code."""
    folder = Path(path)
    if not folder.exists():
        folder = _cached_hub_model(str(path))
        if folder is None:
            raise ValueError(_missing(str(path)))
    if not folder.is_dir():
        raise ValueError(
            f"model {path} is a file; expected a Hugging Face model folder (config.json, weights, tokenizer)"
        )
    if not any(folder.iterdir()):
        raise ValueError(f"model folder {path} is empty")
    if (folder / ADAPTER_CONFIG).is_file():  # transformers would load its base, and the adapter onto it, unasked
        raise ValueError(
            f"{path} is a LoRA adapter (a --use_peft checkpoint), not a whole model: merge it onto its base first, "
            f"`python -m gcpo_fast.lora merge --adapter {path} --out DIR`, and pass DIR"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"model folder {path} has no weights (none of {', '.join(WEIGHT_FILES)})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    remote = _remote_code(folder)
    if remote and not trust_remote_code:
        raise ValueError(
            f"model folder {path} ships its own Python code ({remote}, auto_map in config.json), which runs only "
            "with --trust_remote_code: pass it if you trust that code"
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"model folder {path}: cannot read config.json: {_first_line(e)}") from None
    kind = config.model_type
    if config.is_encoder_decoder:
        raise ValueError(f"model {path} ({kind}) is an encoder-decoder, not a causal decoder-only LM")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in config_auto_map(config):
        raise ValueError(f"model {path}: transformers has no causal-LM class for model_type {kind!r}")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ValueError(
            f"model {path} is an encoder ({kind}): as {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[kind]} it would "
            "attend to future tokens (its config does not set is_decoder); use a causal decoder-only LM"
        )
    return folder


def config_auto_map(config) -> dict:
    return getattr(config, "auto_map", None) or {}


def _remote_code(folder: Path) -> str | None:
    """The Python files config.json's auto_map points at, when only they can load the model (its model_type is
    not one transformers knows; for a known type transformers uses its own class and runs nothing)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        auto_map, kind = config.get("auto_map") or {}, config.get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: AutoConfig says so
    if not isinstance(auto_map, dict) or not auto_map or kind in CONFIG_MAPPING_NAMES:
        return None
    refs = [r for ref in auto_map.values() for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str)]
    return ", ".join(sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})) or "auto_map"


def load_tokenizer(path, *, trust_remote_code: bool = False):
    """The tokenizer of the model folder at `path` (checked first); ValueError if it cannot be used."""
    folder = check_model_folder(path, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"model folder {path}: cannot load the tokenizer: {_first_line(e)}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(f"model folder {path}: the tokenizer has no vocabulary ({len(tokenizer)} tokens, all special)")
    check_vocabulary(path, tokenizer, AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
    return tokenizer


def frozen_dtype(bf16: bool, device) -> torch.dtype:
    """The dtype of a model that never trains (the reference model, the teacher): bf16 under --bf16 on CUDA
    (half the memory, and the flash kernels take it), else fp32 like the policy."""
    return torch.bfloat16 if bf16 and torch.device(device).type == "cuda" else torch.float32


def check_vocabulary(path, tokenizer, config) -> None:
    """ValueError unless every id the tokenizer can give the model (its base vocabulary, its added tokens: chat
    markers, EOS, padding) is below the model's vocab_size: a larger one indexes past the embedding (an
    IndexError at the first generate). The unknown token is left out: a byte-level tokenizer never emits it,
    and transformers adds one beyond the vocabulary to some of them when loading."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is None:
        return
    added = {t: i for t, i in tokenizer.get_added_vocab().items() if t != tokenizer.unk_token}
    token, largest = max([("the base vocabulary's last", tokenizer.vocab_size - 1), *added.items()], key=lambda x: x[1])
    if largest >= vocab:
        raise ValueError(
            f"model folder {path}: the tokenizer gives ids up to {largest} ({token} token) but the model's vocab_size "
            f"is {vocab} (config.json): they would index past its embedding; the tokenizer does not belong to this "
            "model"
        )


def load_causal_lm(
    path,
    *,
    device,
    dtype=torch.float32,
    attn_implementation=None,
    gradient_checkpointing=False,
    trust_remote_code: bool = False,
):
    """The causal LM of the model folder at `path` (checked first) in `dtype` ("auto": as saved) on `device`;
    attn_implementation None leaves transformers' default. ValueError if its weights cannot be read or do not
    cover every parameter."""
    folder = check_model_folder(path, trust_remote_code=trust_remote_code)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    kwargs["trust_remote_code"] = trust_remote_code
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True, **kwargs)
    except torch.OutOfMemoryError:
        raise
    # what unreadable or mismatched weight files raise (safetensors, torch.load, transformers' shape checks)
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        raise ValueError(f"model folder {path}: cannot load the weights: {_first_line(e)}") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"model folder {path}: the weights lack {len(missing)} of the model's parameters "
            f"(e.g. {missing[0]}), which would start random"
        )
    model = model.to(device)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward (non-reentrant). transformers 5.24 renamed the method and
    5.25 warns on the old name, which is the only one 5.17 (the lower bound) has."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model) -> bool:
    """Whether enable_checkpointing is on, under either transformers name."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing
