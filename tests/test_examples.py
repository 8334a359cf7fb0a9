"""Every script in examples/ runs, with its small defaults, as a user would run it, and answers ``--help``."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# The main demo stays in the quick run (-m "not slow"); the others take 4-30 s each on a 2-core machine.
QUICK = {"quickstart.py"}


def run(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


@pytest.mark.parametrize(
    "script",
    [pytest.param(p, marks=() if p.name in QUICK else pytest.mark.slow) for p in EXAMPLES],
    ids=[p.name for p in EXAMPLES],
)
def test_example_runs(script):
    result = run([str(script)], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "an example should print what it shows"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_has_help(script):
    """``--help`` lists the options and exits 0 without running the example."""
    result = run([str(script), "--help"], timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("usage:"), result.stdout[:400]
    assert "--seed" in result.stdout


def test_plot_without_matplotlib_says_how_to_install_it():
    """``natural_gradient_vi.py --plot`` with matplotlib missing stops at once with the install command, not with a
    traceback after the optimization."""
    script = ROOT / "examples" / "natural_gradient_vi.py"
    hide_matplotlib = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "  # what `import matplotlib` sees when it is missing
        f"sys.argv = [{str(script)!r}, '--plot']; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = run(["-c", hide_matplotlib], timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert "pip install matplotlib" in result.stderr
    assert not result.stdout, "it should stop before the optimization prints anything"
