"""The top-level name `kernels` is Hugging Face's, which transformers imports whenever it is installed; this repo's
`kernels/` folder is `gcpo_fast.kernels` only (setup.py's docstring says how). Run as a user runs the README's
commands: a child Python whose working directory is the repo root, so the root is first on sys.path."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_FOLDER = str(ROOT / "kernels")


def from_the_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def installed(distribution: str) -> bool:
    """By its metadata: find_spec("kernels") would find our folder from the root."""
    try:
        return bool(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return False


def test_from_the_root_kernels_is_hugging_faces_and_transformers_models_import():
    """With Hugging Face's kernels installed (the newest transformers requires it) `import kernels` is theirs; with
    it absent (transformers < 5.25, CI's oldest set) transformers' models import all the same."""
    code = (
        "import importlib, os\n"
        "from transformers import AutoModelForCausalLM, Qwen2ForCausalLM\n"
        "import gcpo_fast.kernels as ours\n"
        "from gcpo_fast.kernels import linear_policy_loss\n"
        "print(os.path.dirname(os.path.abspath(ours.__file__)))\n"
    )
    if installed("kernels"):
        code += (
            "theirs = importlib.import_module('kernels')\n"
            "from kernels import CUDAProperties, LayerRepository\n"  # what transformers' hub_kernels imports
            "print(os.path.dirname(os.path.abspath(theirs.__file__)))\n"
        )
    done = from_the_root(code)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, *theirs = done.stdout.split()
    assert ours == OUR_FOLDER
    assert OUR_FOLDER not in theirs, "`import kernels` from the repo root found this repo's folder"
    assert len(theirs) == installed("kernels")


def test_from_the_root_without_hugging_faces_kernels_nothing_of_ours_answers_to_the_name():
    """-S leaves site-packages (and so Hugging Face's kernels) off sys.path. `import kernels` then gets what Python
    gives for an empty folder of that name (a namespace package, which transformers reads as "not installed"):
    no file, no search path, none of our modules under it."""
    code = (
        "import sys\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None), list(kernels.__path__), hasattr(kernels, 'linear_policy_loss'))\n"
        "try:\n"
        "    import kernels.policy_loss\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('kernels.', 'gcpo_fast'))))\n"
    )
    done = from_the_root(code, "-S")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["None [] False", "kernels.policy_loss", "[]"], done.stdout
