"""The benchmark script runs end to end at tiny sizes; every baseline and floor it times computes what ours does.

No timing is asserted: the machine is shared and noisy. What can fail here is the script itself (so it cannot rot)
and the agreement between this library and each baseline and hand-written floor it is timed against.
"""

import inspect
import json
import pathlib
import re
import subprocess
import sys

import pytest

from torch_mvn_ext import JacobianMVN

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
FLOOR_CASES = ["lpg", "jac_loc", "jac_scale_tril", "jac_cov", "precision", "autograd", "autograd_tril"]
CASES = FLOOR_CASES + ["svi", "nuts"]
HAS_OUT = "out" in inspect.signature(JacobianMVN.jacobian).parameters


def run_script(tmp_path, args, timeout, plot=False):
    args = [*args, "--rounds", "1", "--min-time", "0", "--out", str(tmp_path), *([] if plot else ["--no-plot"])]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, json.loads((tmp_path / "results.json").read_text())


def check_agreement(row):
    limit = 1e-4 if row["dtype"] == "float32" else 1e-10
    if row["max_rel_error"] is not None:  # None for SVI steps, which draw different samples
        assert row["max_rel_error"] < limit, row
    if row["floor_s"] is not None:
        assert row["floor_max_rel_error"] < limit, row


def test_benchmark_script_runs_at_tiny_sizes(tmp_path):
    args = ["--cases", *CASES, "out_buffer", "memory", "--d", "3", "--n", "1", "8", "--dtypes", "float32", "float64"]
    args += ["--memory-min-n", "8", "--nuts-samples", "2", "--out-batch", "4"]
    stdout, report = run_script(tmp_path, args, timeout=300)
    assert "### Speedup, float32" in stdout and "### library / floor, float64" in stdout

    speed = [r for r in report["results"] if r["kind"] == "speed"]
    assert {r["case"] for r in speed} == set(CASES) | ({"out_buffer"} if HAS_OUT else set())
    assert {(r["dtype"], r["d"], r["N"]) for r in speed} == {(t, 3, n) for t in ("float32", "float64") for n in (1, 8)}
    for r in speed:
        assert r["ours_s"] > 0 and r["baseline_s"] > 0
        check_agreement(r)
        if r["case"] in FLOOR_CASES and r["ours"] == "ours_noval":  # the floor, on the unvalidated library's rows
            assert r["floor_s"] > 0 and r["library_over_floor"] == r["ours_s"] / r["floor_s"], r
        else:
            assert r["floor_s"] is None and r["library_over_floor"] is None, r
    if not HAS_OUT:  # the case is written to API.md's out=; until the library has it, it says why it is skipped
        assert "out_buffer      skipped: JacobianMVN.jacobian has no out= parameter" in stdout
        assert any(reason.startswith("out_buffer: ") for reason in report["skipped"])

    memory = [r for r in report["results"] if r["kind"] == "memory"]
    full = {"ours_scale_tril", "vmap_grad_scale_tril", "ours_cov", "vmap_grad_cov"}
    assert {r["impl"] for r in memory} == full | {"ours_cov_vech", "ours_scale_tril_vech"}
    for r in memory:  # the output is allocated during the call, so the peak cannot be below it
        entries = 3 * 3 if r["impl"] in full else 3 * 4 // 2
        assert r["output_bytes"] == 8 * entries * (4 if r["dtype"] == "float32" else 8)
        assert r["peak_bytes"] >= r["output_bytes"]

    md = (tmp_path / "results.md").read_text()
    assert "| baseline | d | N=1 | N=8 |" in md  # lpg's speedups: one case, so no case column
    assert "| torch | 3 | " in md
    assert "| case | baseline | d | N=1 | N=8 |" in md  # the Jacobians': three cases
    targets = {t["target"] for t in report["targets"]}
    expected = {"lpg vs torch, d=8, N=1", "lpg, ours_noval / floor, d=8, N=1"}
    assert expected | {"jac_cov, ours_noval / floor, d=64, N=1024"} <= targets


def test_compiled_case_at_one_tiny_size(tmp_path):
    """The library and torch's MVN compiled with inductor (about 15 s here, most of it compiling)."""
    args = ["--cases", "compiled", "--compiled-sizes", "3x4", "--dtypes", "float64"]
    _, report = run_script(tmp_path, args, timeout=240)
    rows = report["results"]
    assert {(r["baseline"], r["ours"], r["d"], r["N"]) for r in rows} == {
        ("torch_compiled", "ours_compiled", 3, 4),
        ("ours_eager", "ours_compiled", 3, 4),
    }
    for r in rows:
        check_agreement(r)
        assert r["library_over_floor"] > 0


def test_solve_benchmark_runs_and_checks_its_routes():
    """``benchmarks/solves.py`` checks each way of forming alpha against a float64 solve before timing it."""
    script = SCRIPT.parent / "solves.py"
    args = ["--d", "3", "--n", "5", "--rounds", "1", "--min-time", "0"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("float")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("float32", "3", "5"), ("float64", "3", "5")]
    assert all(float(x) > 0 for r in rows for x in r[3:6] + r[8:])  # times and ratios (GF/s rounds to 0 here)


def test_report_for_the_reference_has_a_picture_per_family_and_narrow_tables(tmp_path):
    """``--docs DIR`` writes ``DIR/benchmark_results.rst`` with one PNG per family of cases run, in
    ``DIR/benchmark_plots/``, shown with ``.. image::``; a family's picture from an earlier run that this one has no
    results for is removed, other files are left alone; every table has at most 7 columns."""
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib (the plot extra)")
    docs = tmp_path / "docs"
    (docs / "benchmark_plots").mkdir(parents=True)
    (docs / "benchmark_plots" / "precision.png").write_bytes(b"stale")  # no precision case below
    (docs / "benchmark_plots" / "other.png").write_bytes(b"not ours")
    args = ["--cases", "lpg", "jac_loc", "jac_cov", "svi", "--d", "3", "--n", "1", "8", "--dtypes", "float32"]
    run_script(tmp_path / "results", [*args, "--docs", str(docs)], timeout=300, plot=True)

    families = ["lpg", "jacobians", "pyro"]
    pictures = sorted(p.name for p in (docs / "benchmark_plots").iterdir())
    assert pictures == sorted([f"{name}.png" for name in families] + ["other.png"])
    for name in families:
        for folder in (docs / "benchmark_plots", tmp_path / "results" / "plots"):
            assert (folder / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    rst = (docs / "benchmark_results.rst").read_text()
    assert re.findall(r"^\.\. image:: (\S+)$", rst, flags=re.M) == [f"benchmark_plots/{n}.png" for n in families]
    assert (tmp_path / "results" / "results.rst").read_text() == rst.replace("benchmark_plots/", "plots/")
    tables = rst.split(".. list-table::")[1:]
    assert tables
    for table in tables:
        header = table.split("\n   * - ")[1]  # the header row, up to the first data row
        assert header.count("\n     - ") + 1 <= 7, header

    docutils_core = pytest.importorskip("docutils.core")  # the docs extra; the reference build checks it too
    docutils_core.publish_doctree(rst, settings_overrides={"halt_level": 2, "report_level": 2})


def test_docs_without_pictures_is_refused_before_running(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--docs", str(tmp_path), "--no-plot", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--docs needs the pictures" in result.stderr
    assert not list(tmp_path.iterdir())
