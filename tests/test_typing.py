"""The public API's types, as a user's type checker sees them.

``tests/typed_usage.py``, a typed user script, passes ``mypy --strict`` against the package where a fresh interpreter
imports it from, with no configuration of this project's; misuses of the same calls are rejected with the error a
user would get; and the script runs, so the types it asserts are the types the calls return.
"""

import os
import pathlib
import re
import site
import subprocess
import sys
import sysconfig

import pytest
from typed_usage import main as run_typed_usage

HERE = pathlib.Path(__file__).resolve().parent
USAGE = HERE / "typed_usage.py"

# Misuses of the headline calls, each with the error code mypy must give for it.
MISUSES = [
    ('d.jacobian(x, "value")["loc"]', "index"),  # one name gives a tensor, not a dict
    ('d.jacobian(x, ("loc", "value")).shape', "attr-defined"),  # several names give a dict
    ('d.jacobian(x, "value", out={"value": x})', "call-overload"),  # out= for one name is a tensor
    ('d.jacobian(x, ["loc"], out=x)', "call-overload"),  # and a dict for several
    ('d.marginal("01")', "arg-type"),  # dims are ints (a str is a sequence of str)
    ("d.condition([0.5], x)", "list-item"),  # and only ints
]
MISUSE_HEADER = """\
import torch
from torch_mvn_ext import JacobianMVN

d = JacobianMVN(torch.zeros(2), covariance_matrix=torch.eye(2))
x = torch.zeros(4, 2)
"""


def package_home(cwd):
    """The folder holding the ``torch_mvn_ext`` a fresh interpreter started in ``cwd`` imports (in CI, the installed
    copy; in a checkout, the source tree, through PYTHONPATH or an editable install's import hook), and whether it
    is a site-packages folder."""
    code = "import importlib.util as u; s = u.find_spec('torch_mvn_ext'); print(s.origin if s else '')"
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
    home = pathlib.Path(result.stdout.strip()).parent.parent.resolve()
    paths = sysconfig.get_paths()
    site_dirs = {pathlib.Path(p).resolve() for p in [*site.getsitepackages(), paths["purelib"], paths["platlib"]]}
    return home, home in site_dirs


def mypy_errors(output):
    """``{(file name, line): error code}`` from mypy's report."""
    found = {}
    for path, line, code in re.findall(r"^(.+?):(\d+): error: .*\[([a-z-]+)\]$", output, flags=re.M):
        found[pathlib.Path(path).name, int(line)] = code
    return found


@pytest.mark.slow  # mypy reads torch's annotations: 10-30 s
def test_user_script_passes_mypy_strict_and_misuse_fails(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (it comes with the dev extra)")
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE_HEADER + "".join(f"{line}\n" for line, _ in MISUSES))
    first = MISUSE_HEADER.count("\n") + 1
    config = tmp_path / "mypy.ini"  # this project's settings play no part; --strict is the user's
    config.write_text("[mypy]\n")

    home, installed = package_home(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    if not installed:
        # mypy neither reads PYTHONPATH nor runs import hooks (the README's note on editable installs): it is told
        # where the source tree is, as a user would tell it.
        env["MYPYPATH"] = str(home)
    cmd = [sys.executable, "-m", "mypy", "--strict", "--config-file", str(config), "--cache-dir", str(tmp_path / "c")]
    # The package's own code is not the user's: errors in it are not reported, as for any installed package.
    cmd += ["--follow-imports=silent", "--no-pretty", "--no-error-summary", str(USAGE), str(misuse)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert "error: Cannot find implementation or library stub" not in result.stdout, result.stdout
    errors = mypy_errors(result.stdout)

    assert not {k: v for k, v in errors.items() if k[0] == USAGE.name}, result.stdout
    expected = {("misuse.py", first + i): code for i, (_, code) in enumerate(MISUSES)}
    assert errors == expected, result.stdout + result.stderr


def test_user_script_runs_and_gets_the_types_it_asserts(capsys):
    run_typed_usage()
    assert capsys.readouterr().out.strip() == "ok"
