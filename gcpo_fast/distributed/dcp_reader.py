"""Reading FSDP's sharded optimizer state (torch.distributed.checkpoint) without trusting its pickle.

    from gcpo_fast.distributed.dcp_reader import SafeFileSystemReader
    reader = SafeFileSystemReader("runs/x/checkpoint-100/optimizer")
    reader.read_metadata()                              # MetadataRefused (one line) if it names anything else
    dcp.load(state_dict, storage_reader=reader)

torch.distributed.checkpoint's FileSystemReader reads `optimizer/.metadata` with a bare `pickle.load`: a
checkpoint from someone else (a download, a shared folder) could run any code on `--resume`. Its
tensors are safe already (the .distcp shards hold raw bytes, and torch.load(weights_only=True) for
the rest). This reader unpickles the metadata with an allowlist instead: the metadata dataclasses of
torch.distributed.checkpoint, torch.Size, torch dtypes and layouts, pathlib paths, and nothing else.
Those are the only globals torch 2.13 writes there; any other name in the file is refused before it
is called, with a ValueError naming the file and the global.

Which files of a checkpoint are trusted, and why (docs/failures.md says the same for users):
- model.safetensors: a header and raw tensors, no code (safetensors);
- trainer_state.pt, rank_<r>.pt: torch.load(weights_only=True), which builds tensors and plain containers
  only, never calls a global it does not know;
- optimizer/*.distcp: raw tensor bytes (their non-tensor items through weights_only torch.load);
- optimizer/.metadata: a pickle, read by this module's allowlisting unpickler;
- config.json, generation_config.json, tokenizer files, checkpoint.json: JSON (and the tokenizer's
  chat template, which transformers renders in a jinja sandbox); a config.json that maps to Python
  files (auto_map) runs nothing without --trust_remote_code;
- train_config.yaml: yaml.safe_load.
"""

import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# module -> the names a metadata pickle may use from it
ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class MetadataRefused(ValueError):
    """A metadata file that names a global outside the allowlist."""


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise MetadataRefused(
            f"{self.path}: refers to {module}.{name}, which the metadata torch writes never holds: refused "
            "(the checkpoint was altered; loading it could run code)"
        )


def load_metadata(path) -> Metadata:
    """The Metadata in file `path`, unpickled through the allowlist."""
    data = pathlib.Path(path).read_bytes()
    try:
        metadata = _AllowlistUnpickler(io.BytesIO(data), path).load()
    except MetadataRefused:
        raise
    except Exception as e:  # a cut or corrupt pickle raises many types (EOFError, UnpicklingError, ...)
        raise ValueError(f"{path}: damaged ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise MetadataRefused(f"{path}: holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose read_metadata goes through the allowlist (the rest is torch's own)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = load_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
