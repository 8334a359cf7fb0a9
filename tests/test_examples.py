"""Every script in examples/ runs, with its small defaults, as a user would run it, and answers ``--help``."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# The main demo stays in the quick run (-m "not slow"); the others take 4-30 s each on a 2-core machine.
QUICK = {"quickstart.py"}


def run(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def check_langevin(stdout):
    """The claim of its docstring: ULA's covariance is off by many Monte Carlo standard errors and matches the
    predicted ULA covariance; MALA's matches the target's (an unbiased sampler's largest error over the 10 entries
    is about 2-3 standard errors)."""
    ula = re.search(r"^ULA .*covariance vs Sigma +([\d.]+) +vs its predicted covariance +([\d.]+)", stdout, re.M)
    mala = re.search(r"^MALA .*covariance vs Sigma +([\d.]+)", stdout, re.M)
    assert ula and mala, stdout
    assert float(ula[1]) > 5 and float(ula[2]) < 4 and float(mala[1]) < 4, stdout


def check_factor_analysis(stdout):
    """The claims of its docstring: the fit's log-likelihood is at least the true parameters'; its mean and variances
    are the sample's (exact properties of the maximum, up to the optimizer's tolerance); its covariance is the truth's
    within Monte Carlo error; the per-sample scores give the exact standard errors of the mean."""
    gain = re.search(r"^fitted minus true log-likelihood per point ([-+][\d.]+)", stdout, re.M)
    mean = re.search(r"^fitted mean vs sample mean, largest error in sd ([\d.e+-]+)", stdout, re.M)
    variances = re.search(r"^fitted variances vs sample variances, largest relative error ([\d.e+-]+)", stdout, re.M)
    cov = re.search(r"^covariance vs truth, .*: fitted ([\d.]+), sample covariance ([\d.]+)", stdout, re.M)
    se = re.search(r"^standard errors of the mean from the per-sample scores .* ([\d.]+) to ([\d.]+)", stdout, re.M)
    assert gain and mean and variances and cov and se, stdout
    assert float(gain[1]) >= 0 and float(mean[1]) < 1e-4 and float(variances[1]) < 1e-4, stdout
    assert float(cov[1]) < 5 and float(cov[1]) < 1.5 * float(cov[2]), stdout
    assert 0.95 < float(se[1]) <= float(se[2]) < 1.05, stdout


# What an example's output must show, beyond running: the claim its docstring makes, where it is a number.
CLAIMS = {"langevin.py": check_langevin, "factor_analysis.py": check_factor_analysis}


@pytest.mark.parametrize(
    "script",
    [pytest.param(p, marks=() if p.name in QUICK else pytest.mark.slow) for p in EXAMPLES],
    ids=[p.name for p in EXAMPLES],
)
def test_example_runs(script):
    result = run([str(script)], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "an example should print what it shows"
    if script.name in CLAIMS:
        CLAIMS[script.name](result.stdout)


# Runs ``script --help`` as ``python script --help`` would, recording the parser the script builds and which modules
# were imported by the time it exited.
HELP_RUNNER = """
import argparse, contextlib, io, json, runpy, sys
parsers = []
parse_args = argparse.ArgumentParser.parse_args

def recording(self, *args, **kwargs):
    parsers.append(self)
    return parse_args(self, *args, **kwargs)

argparse.ArgumentParser.parse_args = recording
path = sys.argv[1]
sys.argv = [path, "--help"]
out, code = io.StringIO(), None
try:
    with contextlib.redirect_stdout(out):
        runpy.run_path(path, run_name="__main__")
except SystemExit as e:
    code = e.code
options = [
    {"flags": a.option_strings, "help": a.help, "default": str(a.default)}
    for a in (parsers[-1]._actions if parsers else [])
    if not isinstance(a, argparse._HelpAction)
]
loaded = sorted(m for m in ("torch", "pyro", "numpy", "matplotlib", "torch_mvn_ext") if m in sys.modules)
sys.__stdout__.write(json.dumps({"code": code, "stdout": out.getvalue(), "options": options, "loaded": loaded}))
"""


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_help_is_immediate_and_complete(script):
    """``--help`` exits 0 without running the example and before torch, Pyro or this package load (so it answers
    in a fraction of a second), and every option says what it does and shows its default."""
    result = run(["-c", HELP_RUNNER, str(script)], timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["code"] == 0, report
    assert report["loaded"] == [], f"--help imported {report['loaded']}"
    text = report["stdout"]
    assert text.startswith("usage:"), text[:400]
    flat = " ".join(text.split())  # help lines wrap at any space
    assert any(o["flags"] == ["--seed"] for o in report["options"])
    for option in report["options"]:
        assert option["help"] and option["help"].strip(), f"{option['flags']} has no help text"
        assert f"(default: {option['default']})" in flat, (option, text)


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
