"""Every script in examples/ runs, with its small defaults, as a user would run it, and answers ``--help``."""

import json
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


# Runs ``script --help`` for every script in one interpreter (one torch import instead of one per script); each
# result is the exit code and what the script printed, or the traceback of anything other than an exit.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys, traceback
results = {}
for path in sys.argv[1:]:
    out, code = io.StringIO(), None
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        code = traceback.format_exc()
    results[path] = {"code": code, "stdout": out.getvalue()}
sys.__stdout__.write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_results():
    result = run(["-c", HELP_RUNNER, *map(str, EXAMPLES)], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_has_help(script, help_results):
    """``--help`` lists the options and exits 0 without running the example."""
    result = help_results[str(script)]
    assert result["code"] == 0, result["code"]
    assert result["stdout"].startswith("usage:"), result["stdout"][:400]
    assert "--seed" in result["stdout"]


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
