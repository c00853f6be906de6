"""What a model folder is, as a short hash: the same files give the same identity wherever the folder lives.

    from gcpo_fast.models.identity import base_identity, model_identity
    model_identity("~/models/teacher")      # 16 hex digits: config, tokenizer, weight files' names, sizes, ends
    base_identity("~/models/base")          # and the start of every tensor (a change confined to some layers)

A golden-answer teacher's cache is keyed by model_identity (gcpo_fast/golden/teacher.py); a resumed run that reads
--model again records and compares base_identity (gcpo_fast/run/resume_policy.py). Both read a few MB, whatever
the model's size.
"""

import hashlib
import json
import struct
from pathlib import Path

IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MIB = 1 << 20
TENSOR_SAMPLE = 4096  # bytes read from the start of every tensor of the base for its identity


def model_identity(folder) -> str:
    """A 16-hex-digit hash of what makes a model: its config, tokenizer and weights. Weight files count by
    name, size and their first and last MiB, so that a 100 GB teacher is identified in milliseconds."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.name in IDENTITY_FILES:
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(MIB)
                f.seek(max(size - MIB, 0))
                digest.update(path.name.encode() + str(size).encode() + head + f.read(MIB))
    return digest.hexdigest()[:16]


def base_identity(folder) -> str:
    """What --model's files are: model_identity (config, generation config and tokenizer files,
    each weight file's name, size and first and last MiB) and the first TENSOR_SAMPLE bytes of every tensor of its
    safetensors files, so that a change confined to some layers (an adapter merged into the base) is seen too;
    a few MB read, whatever the model's size."""
    digest = hashlib.sha256(model_identity(folder).encode())
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            try:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size)) if size < 100 << 20 else {}
            except (struct.error, ValueError):  # not safetensors: loading the model says so
                continue
            for name, entry in sorted(header.items()):
                if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
                    begin, end = entry["data_offsets"][:2]
                    f.seek(8 + size + begin)
                    digest.update(name.encode() + f.read(min(TENSOR_SAMPLE, max(end - begin, 0))))
    return digest.hexdigest()[:16]
