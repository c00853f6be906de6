#!/usr/bin/env bash
# The wheels the GPU machine's image lacks and the GPU check needs, in one folder carried with the working tree.
#
#   bash benchmarks/gpu_carry.sh gpu_carry          # -> gpu_carry/*.whl (git-ignored: /gpu_carry/ in .gitignore)
#
# The image (Python 3.12, torch 2.11.0+cu130, transformers 5.17.0, triton 3.6.0, sympy, numpy, safetensors,
# pytest; no network; no PEFT, flash-attn, vLLM) has no math-verify (the trainer's reward imports it),
# Liger-Kernel, Cut Cross-Entropy or TRL (bench_loss's peers; TRL's fused LM head imports only torch, triton and
# transformers) and no pytest-xdist (the tests stage's workers). All of these are pure-Python wheels; --no-deps
# because their other requirements (torch, triton, sympy, pytest) are the image's own. The folder must stay under the 64 MiB that may be
# carried; the script checks that and prints the size. On the GPU machine (benchmarks/README.md):
#   pip install --no-index --no-deps --find-links gpu_carry gpu_carry/*.whl
set -euo pipefail
DIR=${1:?usage: bash benchmarks/gpu_carry.sh DIR}
LIMIT_MIB=64
WHEELS=(
    math-verify==0.9.0
    latex2sympy2_extended==1.11.0   # math-verify's parser
    antlr4-python3-runtime==4.13.2  # latex2sympy2_extended's runtime (its bound: >=4.9.3,<=4.13.2)
    liger-kernel==0.8.5             # bench_loss --variants liger
    cut-cross-entropy==25.1.1       # bench_loss --variants cce
    trl==1.16.0                     # bench_loss --variants trl: trl.kernels.chunked_logprob (torch, triton, transformers)
    pytest-xdist==3.8.0             # the tests stage's -n 8
    execnet==2.1.2                  # pytest-xdist's worker transport
)
mkdir -p "$DIR"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DIR" "${WHEELS[@]}"
bytes=$(du -sb "$DIR" | cut -f1)
mib=$(python -c "print(f'{$bytes / 2**20:.2f}')")
echo "$DIR: $(ls "$DIR" | wc -l) wheels, $mib MiB (limit $LIMIT_MIB MiB with the rest of what is carried)"
ls -1 "$DIR"
if [ "$bytes" -ge $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "gpu_carry: $DIR is $mib MiB, over the $LIMIT_MIB MiB that may be carried" >&2
    exit 1
fi
