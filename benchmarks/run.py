r"""Speed and memory of ``torch_mvn_ext`` against what a user would otherwise write.

Every case times this library ("ours") and one or more baselines on the same inputs, in one process, in
interleaved rounds (the order alternates each round), and reports the ratio of medians
``baseline / ours`` (> 1 means this library is faster). Each timed callable includes building the
distribution, as user code does at every step. Before timing, each baseline's result is compared with ours.
The speed cases also time the floor: the plain closed form a careful user writes by hand in a few lines, with no
validation, reported as ``library / floor`` (``floors.py``).

The cases are the entries of ``cases.REGISTRY`` (``cases.py`` describes each; ``registry.py`` what an entry holds);
timing, checking and memory measurement are in ``timing.py``, the report in ``report.py``, the pictures in
``plots.py``. This file is the command line.

Usage::

    python benchmarks/run.py                 # full grid, float32 and float64: tens of minutes
    python benchmarks/run.py --quick         # a few sizes, float32: about a minute (43-77 s on 2 shared cores)
    python benchmarks/run.py --device cuda   # the same on a GPU (CPU-only cases skipped)
    python benchmarks/run.py --cases lpg memory --d 8 --n 1 16 --dtypes float32 --rounds 3 --min-time 0.001
    python benchmarks/run.py --docs          # the full grid, and the reference's copy of the report (see below)

Results go to ``benchmarks/results/``, or to ``--out``: ``results.json``, ``results.md``, ``results.rst`` and, if
matplotlib is installed, ``plots/<family>.png``, one picture per family of cases (``lpg``; the ``jac_*`` cases;
``precision``; ``autograd`` and ``autograd_tril``; ``compiled``; ``out_buffer``; ``svi`` and ``nuts``; the
``many_small_*`` cases; the ``lowrank_*`` cases) with a panel per case and baseline (the speedup) and per case with a
floor (``library / floor``), against ``N`` (``d`` for the ``lowrank_*`` cases).
``--docs`` also writes the report into the reference: ``docs/benchmark_results.rst``, which ``docs/performance.rst``
includes, with the pictures in ``docs/benchmark_plots/``; it is how that page is regenerated.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings

import cases
import plots
import registry
import report
import timing
import torch
from solve_routes import ROUTES, set_solve_route

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="float32, d in (8, 64), N in (1, 1024), fewer rounds: about a minute"
    )
    p.add_argument("--cases", nargs="+", choices=list(cases.REGISTRY), default=None, help="cases to run (default: all)")
    p.add_argument("--d", nargs="+", type=int, default=None, help="event sizes (default 2 8 64 256)")
    p.add_argument("--n", nargs="+", type=int, default=None, help="numbers of points (default 1 1024 16384)")
    p.add_argument("--extra-sizes", nargs="*", default=None, help="extra dxN points (default 256x4096)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(timing.DTYPES), default=None, help="default float32 float64")
    p.add_argument("--device", default="cpu", help="where inputs are made and every case runs (default cpu)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per size (default 7; quick 5)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per timed sample (default 0.05)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: stable ratios on a machine shared with other jobs; 0: torch's default)",
    )
    p.add_argument("--max-matrix-bytes", type=float, default=2**28, help="skip larger N x d x d outputs (bytes)")
    options = registry.options(cases.REGISTRY)  # the options of the cases, from their entries
    for option in options:
        option.add_to(p)
    p.add_argument(
        "--solve-route",
        choices=ROUTES,
        default="auto",
        help="route of the library's float32 solves (_factor._RIGHT_SOLVE_IS_FASTER; default auto: the machine's)",
    )
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="no pictures (they need matplotlib)")
    p.add_argument(
        "--docs",
        nargs="?",
        const=DOCS,
        default=None,
        metavar="DIR",
        help="also write the report for the reference: DIR/benchmark_results.rst, which docs/performance.rst\n"
        "includes, and its pictures in DIR/benchmark_plots/ (DIR: the repository's docs/ if not given;\n"
        "needs matplotlib)",
    )
    args = p.parse_args(argv)
    if args.docs is not None and (args.no_plot or plots.pyplot() is None):
        p.error("--docs needs the pictures: matplotlib installed (pip install matplotlib) and no --no-plot")
    quick = args.quick
    if args.extra_sizes is None:  # the d=256, N=4096 target point, unless sizes are given
        args.extra_sizes = ["256x4096"] if args.d is None and args.n is None and not quick else []
    if args.cases is None:
        args.cases = list(cases.REGISTRY)
    if args.d is None:
        args.d = [8, 64] if quick else [2, 8, 64, 256]
    if args.n is None:
        args.n = [1, 1024] if quick else [1, 1024, 16384]
    if args.dtypes is None:
        args.dtypes = ["float32"] if quick else ["float32", "float64"]
    for option in options:
        option.resolve(args)
    if args.rounds is None:
        args.rounds = 5 if quick else 7
    if args.min_time is None:
        args.min_time = 0.02 if quick else 0.05
    return args


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*profiler.*")
    device = torch.device(args.device)
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU ({timing.cpu_model()})",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "rounds": args.rounds,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "solve_route": set_solve_route(args.solve_route),  # forces the route for the whole run
    }
    start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results, skipped = timing.run(args, [cases.REGISTRY[name] for name in args.cases])
    targets = report.check_targets(results, cases.REGISTRY)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if load_start is not None:
        meta["load_average"] = [load_start, os.getloadavg()[0]]
    os.makedirs(args.out, exist_ok=True)
    plt = None if args.no_plot else plots.pyplot()
    if plt is None and not args.no_plot:
        print("matplotlib is not installed (pip install matplotlib): no pictures", file=sys.stderr)
    sections = registry.sections(cases.REGISTRY)
    folder = os.path.join(args.out, "plots")
    pictures = plots.write_pictures(plt, results, folder, sections) if plt is not None else {}

    def write_report(path, prefix):
        text = report.markdown(results, targets, meta, skipped, sections, {k: prefix + v for k, v in pictures.items()})
        with open(path, "w") as f:
            f.write(report.markdown_to_rst(text))
        return text

    text = write_report(os.path.join(args.out, "results.rst"), "plots/")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "targets": targets, "skipped": skipped}, f, indent=1)
    print()
    print(text)
    if args.docs is not None:
        # The reference's copy: the same report, its pictures next to it in benchmark_plots/.
        docs_plots = os.path.join(args.docs, "benchmark_plots")
        plots.clear_pictures(docs_plots, sections)
        for name in pictures.values():
            shutil.copyfile(os.path.join(folder, name), os.path.join(docs_plots, name))
        write_report(os.path.join(args.docs, "benchmark_results.rst"), "benchmark_plots/")
        print(f"reference: {os.path.join(args.docs, 'benchmark_results.rst')} and {docs_plots}")
    print(f"results: {args.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
