"""The project's configuration files each hold their own settings; the wheel installs into a fresh virtual
environment and works from there, away from the source tree.

The wheel is the one named by the ``TORCH_MVN_EXT_WHEEL`` environment variable (CI builds it once, with
``python -m build``, and passes it here), or else one built from a copy of this checkout with the running
environment's setuptools (no build isolation, so no download). The new environment gets torch and Pyro from the
running one through a ``.pth`` file: ``python -m venv --system-site-packages`` would not see them when the running
interpreter is itself a virtual environment's, and a plain path line (unlike ``site.addsitedir``) does not run that
environment's ``.pth`` hooks, such as the finder of an editable install of this package.
"""

import configparser
import json
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEEL_ENV = "TORCH_MVN_EXT_WHEEL"
# What a wheel build reads; copied so that the checkout's build/ folder (stale files included) plays no part.
BUILD_INPUTS = ["pyproject.toml", "setup.cfg", "README.md", "LICENSE", "MANIFEST.in", "torch_mvn_ext"]

CHECK = textwrap.dedent(
    """
    import json, pathlib, importlib.metadata as md
    import torch
    from torch.distributions import MultivariateNormal
    import torch_mvn_ext
    from torch_mvn_ext import JacobianMVN

    loc = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    a = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.5]], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]], dtype=torch.float64)
    ours = JacobianMVN(loc, covariance_matrix=a).log_prob(x)
    ref = MultivariateNormal(loc, covariance_matrix=a).log_prob(x)
    package = pathlib.Path(torch_mvn_ext.__file__).resolve().parent
    print(json.dumps({
        "file": str(pathlib.Path(torch_mvn_ext.__file__).resolve()),
        "py_typed": (package / "py.typed").is_file(),
        "max_diff": (ours - ref).abs().max().item(),
        "version": torch_mvn_ext.__version__,
        "dist_version": md.version("torch_mvn_ext"),
        "requires": md.requires("torch_mvn_ext") or [],
    }))
    """
)


def test_each_setting_has_one_home():
    """setup.cfg holds mypy's configuration and nothing else; pyproject.toml holds the metadata, the build and the
    other tools' settings, and no mypy table (mypy would read that one and ignore setup.cfg without a word)."""
    cfg = configparser.ConfigParser()
    assert cfg.read(ROOT / "setup.cfg"), "setup.cfg is missing"
    assert "mypy" in cfg.sections()
    assert all(s == "mypy" or s.startswith("mypy-") for s in cfg.sections()), cfg.sections()
    assert cfg["mypy"]["files"] == "torch_mvn_ext"  # what `mypy` with no arguments checks, in .ci/run
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(r"^\[+tool\.mypy", pyproject, flags=re.M)
    assert re.search(r"^\[project\]", pyproject, flags=re.M)  # the metadata: nowhere else


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = pathlib.Path(given).resolve()
        assert path.is_file() and path.suffix == ".whl", f"{WHEEL_ENV}={given} is not a wheel file"
        return path
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (path,) = out.glob("torch_mvn_ext-*.whl")
    return path


@pytest.mark.slow  # a wheel build (unless CI gives one): 10-20 s
def test_wheel_holds_the_package_and_its_type_marker(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "torch_mvn_ext/py.typed" in names
    assert "torch_mvn_ext/jacobian_mvn.py" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/", "docs/"))], names


@pytest.mark.slow  # a virtual environment with pip and a fresh torch import: 15-40 s
def test_installed_wheel_imports_outside_the_source_tree(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    # Then torch and Pyro from the running environment, after the new environment's own site-packages. Only after
    # the install: with the running environment visible, pip would take a torch_mvn_ext installed there (as in CI)
    # for this one and install nothing.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    running = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (pathlib.Path(purelib) / "running_env.pth").write_text("\n".join(running) + "\n")

    workdir = tmp_path / "elsewhere"  # outside the source tree, so nothing is imported from the checkout
    workdir.mkdir()
    result = subprocess.run(
        [str(python), "-c", CHECK], capture_output=True, text=True, env=env, cwd=workdir, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert pathlib.Path(report["file"]).is_relative_to(env_dir.resolve()), report["file"]
    assert not pathlib.Path(report["file"]).is_relative_to(ROOT), report["file"]
    assert report["py_typed"]
    assert report["max_diff"] < 1e-12
    assert report["version"] == report["dist_version"]
    # Install requirements are those without an ``extra == ...`` marker; only what the package imports.
    install_requires = [r for r in report["requires"] if "extra ==" not in r]
    names = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in install_requires}
    assert names == {"torch", "pyro-ppl"}, install_requires
