"""The benchmark script runs end to end at tiny sizes; every baseline and floor it times computes what ours does.

No timing is asserted: the machine is shared and noisy. What can fail here is the script itself (so it cannot rot)
and the agreement between this library and each baseline and hand-written floor it is timed against. The speed
check's logic (``benchmarks/check.py``: a cell that misses is measured again, then fails with a message naming it;
the exit status) is tested with injected timings.
"""

import inspect
import json
import pathlib
import re
import subprocess
import sys

import cases
import check
import pytest
import registry
import solve_routes
import torch

import torch_mvn_ext
from torch_mvn_ext import JacobianMVN, _factor

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
MANY_SMALL = ["many_small_log_prob", "many_small_rsample", "many_small_lpg"]
FLOOR_CASES = ["lpg", "jac_loc", "jac_scale_tril", "jac_cov", "precision", "autograd", "autograd_tril"]
CASES = FLOOR_CASES + ["svi", "nuts"]
HAS_OUT = "out" in inspect.signature(JacobianMVN.jacobian).parameters
HAS_LOWRANK = hasattr(torch_mvn_ext, "JacobianLowRankMVN")


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
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--docs needs the pictures" in result.stderr
    assert not list(tmp_path.iterdir())


def test_lowrank_cases_at_a_tiny_size(tmp_path):
    """The low-rank cases (sizes d x k x N) are skipped, with a note, by a library without ``JacobianLowRankMVN``; with
    it, every baseline agrees with ours."""
    args = ["--cases", "lowrank_lpg", "lowrank_jac", "--lowrank-sizes", "8x2x4", "--dtypes", "float32", "float64"]
    stdout, report = run_script(tmp_path, args, timeout=120)
    rows = report["results"]
    if not HAS_LOWRANK:
        assert rows == []
        for case in ("lowrank_lpg", "lowrank_jac"):
            assert f"{case:15s} skipped: torch_mvn_ext has no JacobianLowRankMVN" in stdout
            assert any(reason.startswith(f"{case}: ") for reason in report["skipped"])
        return
    assert {(r["case"], r["baseline"], r["d"], r["k"], r["N"]) for r in rows} == {
        (case, baseline, 8, 2, 4)
        for case, baseline in (
            ("lowrank_lpg", "torch"),
            ("lowrank_lpg", "torch_noval"),
            ("lowrank_jac", "vmap_grad"),
            ("lowrank_jac", "functional_jacobian"),
        )
    }
    for r in rows:
        check_agreement(r)


def test_registry_entries_fit_together():
    """Each family's cases share their sizes' names (``registry.sections`` raises otherwise), each target names a
    size of its case's shape, and an option read by several cases is defined alike by each."""
    sections = registry.sections(cases.REGISTRY)
    assert [s.family.name for s in sections] == [
        "lpg",
        "jacobians",
        "precision",
        "autograd",
        "compiled",
        "out_buffer",
        "pyro",
        "many_small",
        "lowrank",
    ]
    for case in cases.REGISTRY.values():
        assert all(len(target.size) == len(case.size_names) for target in case.targets), case.name
    flags = [option.flag for option in registry.options(cases.REGISTRY)]  # raises if two cases define one otherwise
    assert {"--compiled-sizes", "--many-small-sizes", "--lowrank-sizes", "--pyro-max-n"} <= set(flags)


def test_many_small_cases_at_tiny_sizes(tmp_path):
    """B members with their own matrices: library, torch and the elementwise floor agree; too large a B is skipped."""
    args = ["--cases", *MANY_SMALL, "--many-small-sizes", "1x5", "3x8", "8x100", "--dtypes", "float32", "float64"]
    args += ["--max-matrix-bytes", "20000"]  # 8 x 8 x 100 covariances are 25600 bytes in float32
    _, report = run_script(tmp_path, args, timeout=120)
    rows = report["results"]
    pairs = {("torch", "ours"), ("torch_noval", "ours_noval")}
    sizes = {(t, d, n) for t in ("float32", "float64") for d, n in ((1, 5), (3, 8))}
    assert {(r["case"], r["baseline"], r["ours"], r["dtype"], r["d"], r["N"]) for r in rows} == {
        (case, baseline, ours, *size) for case in MANY_SMALL for baseline, ours in pairs for size in sizes
    }
    for r in rows:
        check_agreement(r)
        if r["ours"] == "ours_noval":
            assert r["library_over_floor"] == r["ours_s"] / r["floor_s"], r
    reason = "B x d x d covariances over --max-matrix-bytes"
    assert {k: v for k, v in report["skipped"].items() if reason in k} == {
        f"{case}: {reason}": ["float32 d=8 N=100", "float64 d=8 N=100"] for case in MANY_SMALL
    }


def test_solve_route_is_forced_for_the_run_and_recorded(tmp_path):
    """``--solve-route right`` makes float32 solves leave column-major results (``_factor._solve_rows``), on any CPU."""
    tril = torch.eye(3) + torch.ones(3, 3).tril()
    rows = torch.randn(5, 3)
    auto = _factor._RIGHT_SOLVE_IS_FASTER
    for route, row_major in (("left", True), ("right", False)):
        with solve_routes.solve_route(route) as taken:
            assert taken == route
            assert _factor._solve_rows(tril, rows, transpose=False).is_contiguous() is row_major
        assert _factor._RIGHT_SOLVE_IS_FASTER is auto
    args = ["--cases", "jac_scale_tril", "--d", "3", "--n", "4", "--solve-route", "right"]
    _, report = run_script(tmp_path, args, timeout=60)
    assert report["meta"]["solve_route"] == "right"
    for r in report["results"]:
        check_agreement(r)


def times(library, floor, torch_s):
    """A measurement as ``check.prepare``'s ``measure`` returns it (ratios: of the medians, here)."""
    return {
        "library": library,
        "floor": floor,
        "torch": torch_s,
        "over_floor": library / floor,
        "speedup": torch_s / library,
    }


class Measurements:
    """Injected timings: one set per call, the last repeated; records the rounds each call asked for."""

    def __init__(self, *results):
        self.results, self.rounds = list(results), []

    def __call__(self, rounds, min_time):
        self.rounds.append(rounds)
        return self.results[min(len(self.rounds), len(self.results)) - 1]


def test_speed_check_measures_a_missing_cell_again_before_failing_it():
    cell = check.Cell("jac_scale_tril", 64, 1024, max_over_floor=2.0, min_speedup=1.0, route="right")
    lines = []
    # Misses once, then meets both thresholds: measured twice (twice the rounds), passes.
    measure = Measurements(times(5e-3, 1e-3, 9e-3), times(1.5e-3, 1e-3, 9e-3))
    attempts, failure = check.check_cell(cell, measure, rounds=5, min_time=0.0, retries=2, report=lines.append)
    assert failure is None and measure.rounds == [5, 10] and len(attempts) == 2
    assert "MISS" in lines[0] and lines[1].endswith("ok (again, 2)")
    # Misses every time: measured 1 + 2 times (5, 10, 20 rounds), then fails with the cell, both times and the ratio.
    measure = Measurements(times(5e-3, 1e-3, 9e-3))
    attempts, failure = check.check_cell(cell, measure, rounds=5, min_time=0.0, retries=2, report=lines.append)
    assert measure.rounds == [5, 10, 20] and len(attempts) == 3
    assert failure.startswith("jac_scale_tril d=64 N=1024 (right route) failed 3 measurements: ")
    assert "attempt 3 (20 rounds): library / floor 5.00 > 2 (library 5000 us, floor 1000 us)" in failure
    # Slower than torch: the other threshold, with torch's time.
    measure = Measurements(times(1e-3, 1e-3, 0.5e-3))
    _, failure = check.check_cell(cell, measure, rounds=3, min_time=0.0, retries=0, report=lines.append)
    assert measure.rounds == [3]
    assert failure.endswith("attempt 1 (3 rounds): torch / library 0.50 < 1 (library 1000 us, torch 500 us)")


def test_speed_check_exits_non_zero_when_a_cell_fails(monkeypatch, capsys):
    assert {cell.case for cell in check.CELLS} <= set(cases.REGISTRY)
    slow = check.CELLS[0]
    ratio = 2 * slow.max_over_floor  # library / floor, twice the threshold
    fake = {cell.name: Measurements(times(1e-3, 1e-3, 1e-2)) for cell in check.CELLS}
    fake[slow.name] = Measurements(times(ratio * 1e-3, 1e-3, 1.0))
    monkeypatch.setattr(check, "prepare", lambda cell: fake[cell.name])
    threads = torch.get_num_threads()
    assert check.main(["--retries", "1", "--rounds", "3"]) == 1
    assert torch.get_num_threads() == threads  # the check runs on one thread and gives the others back
    out = capsys.readouterr().out
    assert f"{len(check.CELLS) - 1} of {len(check.CELLS)} cells passed" in out
    expected = f"library / floor {ratio:.2f} > {slow.max_over_floor:g} (library {ratio * 1e3:.0f} us, floor 1000 us)"
    assert [line for line in out.splitlines() if line.startswith("FAILED")] == [
        f"FAILED {slow.name} failed 2 measurements: attempt 1 (3 rounds): {expected}; attempt 2 (6 rounds): {expected}"
    ]
    assert [m.rounds for name, m in fake.items() if name != slow.name] == [[3]] * (len(check.CELLS) - 1)
    fake[slow.name] = Measurements(times(1e-3, 1e-3, 1e-2))
    assert check.main([]) == 0


def test_speed_check_times_its_cells_for_real():
    """The check's own measurement on tiny cells (both routes, a many_small case): the three callables agree and are
    timed."""
    for cell in (
        check.Cell("jac_scale_tril", 3, 4, max_over_floor=2.0, min_speedup=1.0, route="right"),
        check.Cell("jac_scale_tril", 3, 4, max_over_floor=2.0, min_speedup=1.0, route="left"),
        check.Cell("many_small_lpg", 3, 6, max_over_floor=2.0, min_speedup=1.0),
    ):
        measured = check.prepare(cell)(2, 0.0)
        assert all(measured[k] > 0 and len(measured["rounds"][k]) == 2 for k in ("library", "floor", "torch"))
        assert measured["over_floor"] > 0 and measured["speedup"] > 0
