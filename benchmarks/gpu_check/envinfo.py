"""The machine and versions for the report's header, as JSON on stdout (run as a subprocess: the runner itself
never initialises CUDA, so that it holds no GPU context while the stages run).

    python -m benchmarks.gpu_check.envinfo
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata

PACKAGES = (
    "torch", "triton", "transformers", "numpy", "math-verify", "liger-kernel", "cut-cross-entropy", "trl",
    "pytest-xdist", "flash-attn", "peft", "vllm",
)  # fmt: skip


def collect() -> dict:
    import torch

    info = dict(python=platform.python_version(), cuda=torch.version.cuda, cpu_count=os.cpu_count())
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            gpu_memory_GiB=round(p.total_memory / 2**30, 1),
            sms=p.multi_processor_count,
            gpus=torch.cuda.device_count(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


if __name__ == "__main__":
    print(json.dumps(collect()))
