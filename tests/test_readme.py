"""The README's Python snippets run, in order, as a newcomer would paste them, with warnings as errors, in a fresh
interpreter (the ``torch.compile`` caveat's snippet changes a process-wide default)."""

import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The Pyro snippet uses the user's ``model``; this is the smallest one with a latent site.
MODEL = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.5))
    """
)


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 3, "the README shows a tour, a KL divergence and Pyro usage"
    tour, rest = blocks[0], blocks[1:]
    script = "\n".join([tour, MODEL, *rest, "svi.step()", "print('ok')"])
    cmd = [sys.executable, "-W", "error", "-c", script]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")
