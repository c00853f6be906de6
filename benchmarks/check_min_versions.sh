#!/usr/bin/env bash
# The lower bounds of setup.py, checked on a CPU: the GPU machine's image pins transformers 5.17.0 and
# triton 3.6.0 (older than this machine's), so a throwaway virtual environment over this machine's packages
# (--system-site-packages: torch, tokenizers, math-verify, ... as installed) gets those two versions, and the
# tests that lean on them run there: model loading and packing (transformers), the trainer end to end, and
# the kernels' ahead-of-time compile for sm_80/sm_90 (triton). The kernels' interpreter tests are left out:
# triton 3.6's interpreter fails with numpy 2.4.6 (int() of a 1-element array in its range(); 68 tests of
# tests/test_linear_policy_loss.py, seen 2026-11-29), which compiled GPU runs never use.
# Result 2026-11-29: transformers 5.17.0 passes; triton 3.6.0 builds every kernel, but
# _linear_logprob_fwd_kernel's m64 config spills 10 registers in bf16 on sm_80 (255 registers; sm_90 is clean).
#
#   bash benchmarks/check_min_versions.sh                 # venv in /tmp/gcpo_min_versions (reused if there)
#   bash benchmarks/check_min_versions.sh /tmp/other-venv
#
# Never installs into the shared environment. Not run by CI (downloads ~200 MB, runs ~5 min on 2 cores).
# torch's own bound (2.11, the image's) is not installed here (a CUDA wheel of 530 MB plus its CUDA
# libraries): the torch APIs the code calls were read in the 2.11.0 wheel instead (README, "Versions").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/gcpo_min_versions}
TRANSFORMERS=5.17.0
TRITON=3.6.0
[ -x "$VENV/bin/python" ] || python -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q "transformers==$TRANSFORMERS" "triton==$TRITON"
"$VENV/bin/python" - <<EOF
import torch, transformers, triton
assert transformers.__version__ == "$TRANSFORMERS", transformers.__version__
assert triton.__version__ == "$TRITON", triton.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")
EOF
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_models.py tests/test_packing.py tests/test_default_model.py tests/test_train.py \
    tests/test_aot_compile.py
