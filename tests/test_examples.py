"""The examples run as a user runs them (a subprocess: on the CPU with TRITON_INTERPRET=1, and `-m gpu` on
a GPU) and each checks itself against the float64 reference (examples/_verify.py); the README's API sketch is the
marked blocks of examples/api_sketch.py, verbatim."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"api_sketch.py": "api_sketch: OK", "graph_step_loop.py": "graph_step_loop: OK",
            "quantized_cache.py": "quantized_cache: OK"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_and_checks_itself(name, device):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--device", device], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith(EXAMPLES[name]), r.stdout


def sketch_blocks() -> str:
    """The `# [readme]` ... `# [/readme]` blocks of examples/api_sketch.py, joined, one indent removed."""
    text = (ROOT / "examples" / "api_sketch.py").read_text()
    blocks = re.findall(r"# \[readme\]\n(.*?)\n[ ]*# \[/readme\]", text, re.S)
    assert len(blocks) >= 3, "examples/api_sketch.py lost its README markers"
    lines = "\n".join(blocks).splitlines()
    assert all(not ln or ln.startswith("    ") for ln in lines)
    return "\n".join(ln[4:] for ln in lines)


def test_readme_sketch_is_the_example():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## API sketch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert sketch_blocks() in code, "README's API sketch differs from examples/api_sketch.py's [readme] blocks"
    assert "from specssm import SSMCache, StepPlan, checkpointing_ssu" in code
