"""The benchmark script runs end to end at tiny sizes, and every baseline it times computes what ours computes.

No timing is asserted: the machine is shared and noisy. What can fail here is the script itself (so it cannot rot)
and the agreement between this library and each baseline it is timed against.
"""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
CASES = ["lpg", "jac_loc", "jac_scale_tril", "jac_cov", "precision", "autograd", "autograd_tril", "svi", "nuts"]


def test_benchmark_script_runs_at_tiny_sizes(tmp_path):
    args = ["--cases", *CASES, "memory", "--d", "3", "--n", "1", "8", "--dtypes", "float32", "float64"]
    args += ["--rounds", "1", "--min-time", "0", "--memory-min-n", "8", "--nuts-samples", "2", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Speedups, float32" in result.stdout

    report = json.loads((tmp_path / "results.json").read_text())
    speed = [r for r in report["results"] if r["kind"] == "speed"]
    assert {r["case"] for r in speed} == set(CASES)
    assert {(r["dtype"], r["d"], r["N"]) for r in speed} == {(t, 3, n) for t in ("float32", "float64") for n in (1, 8)}
    for r in speed:
        assert r["ours_s"] > 0 and r["baseline_s"] > 0
        if r["max_rel_error"] is not None:  # None for SVI steps, which draw different samples
            limit = 1e-4 if r["dtype"] == "float32" else 1e-10
            assert r["max_rel_error"] < limit, r

    memory = [r for r in report["results"] if r["kind"] == "memory"]
    assert {r["impl"] for r in memory} == {"ours_scale_tril", "vmap_grad_scale_tril", "ours_cov", "vmap_grad_cov"}
    for r in memory:  # the N x d x d output is allocated during the call, so the peak cannot be below it
        assert r["output_bytes"] == 8 * 3 * 3 * (4 if r["dtype"] == "float32" else 8)
        assert r["peak_bytes"] >= r["output_bytes"]

    assert "| lpg | torch | 3 |" in (tmp_path / "results.md").read_text()
    assert {t["target"] for t in report["targets"]} >= {"lpg vs torch, d=8, N=1"}


def test_solve_benchmark_runs_and_checks_its_routes():
    """``benchmarks/solves.py`` checks each way of forming alpha against a float64 solve before timing it."""
    script = SCRIPT.parent / "solves.py"
    args = ["--d", "3", "--n", "5", "--rounds", "1", "--min-time", "0"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("float")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("float32", "3", "5"), ("float64", "3", "5")]
    assert all(float(x) > 0 for r in rows for x in r[3:6] + r[8:])  # times and ratios (GF/s rounds to 0 here)
