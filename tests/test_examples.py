"""Every script in examples/ runs, with its small defaults, as a user would run it."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=script.parent.parent
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "an example should print what it shows"
