"""docs/fused_op.md's example of calling the fused op from a custom loop runs as written."""

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "fused_op.md"


def test_readme_example_runs_and_trains():
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "linear_policy_loss" in b)
    # Append a check that the step really moved the weights the loss touched.
    probe = example.replace("optimizer.step()", "before = model.lm_head.weight.detach().clone()\noptimizer.step()")
    probe += "\nassert not torch.equal(before, model.lm_head.weight), 'optimizer step changed nothing'\n"
    probe += "assert model.lm_head.weight is model.model.embed_tokens.weight\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"loss -?\d+\.\d{4}  entropy \d+\.\d{3}", out.stdout), out.stdout
