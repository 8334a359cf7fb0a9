"""Timing, checking and memory measurement, and the driver that runs the registry's cases with them.

Each case's callables are timed in one process, in interleaved rounds (the order alternates each round), and each
row reports the ratio of medians ``baseline / ours`` (> 1 means this library is faster). Each timed callable
includes building the distribution, as user code does at every step. Before timing, each baseline's result and the
floor's are compared with ours (``max_rel_error``).

Everything runs on ``--device`` (inputs are drawn on the CPU, from a seeded generator, and moved there); on a GPU
the device is synchronized before each timed sample and after each timed call.

Memory is measured with the torch profiler's allocation trace (``profile_memory=True``): every allocation and
free made through torch's CPU allocator, in order, during one call; the peak of their running sum is the peak
number of bytes of tensors the call held at once above what existed before it (inputs not counted, output
counted). It sees every tensor torch allocates, also inside ``vmap`` and LAPACK workspaces that torch
allocates as tensors; it does not see Python objects or memory that BLAS/LAPACK allocate themselves (small).
"""

import math
import platform
import statistics
import time

import torch
from registry import label

from torch_mvn_ext._factor import cpuinfo

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The floor validates nothing: it is compared with, and its ratio given on the rows of, these variants of ours.
FLOOR_VARIANTS = ("ours_noval", "ours_compiled")
WIDTHS = {"d": 4, "N": 6}  # of the sizes in the progress lines


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [torch.as_tensor(out)]


def max_rel_error(ours, ref):
    """Largest difference between two results relative to the reference's largest entry, over all tensors."""
    worst = 0.0
    for a, b in zip(_flatten(ours), _flatten(ref)):
        a, b = a.detach().double(), b.detach().double()
        scale = b.abs().max().clamp_min(1e-30)
        worst = max(worst, float((a - b).abs().max() / scale))
    return worst


def synchronizer(device):
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on CUDA, nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return lambda: None
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return torch.accelerator.synchronize


def time_interleaved(fns, rounds, min_time, sync=lambda: None):
    """Median seconds per call of each callable, timed in interleaved rounds (order alternating).

    ``sync`` runs before each timed sample and after each call, so a call's time includes its queued device work.
    """
    loops = {}
    for name, fn in fns.items():
        fn()  # warm up (lazy imports, allocator, first-call dispatch)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        loops[name] = max(1, math.ceil(min_time / max(elapsed, 1e-7)))
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            fn, k = fns[name], loops[name]
            sync()
            start = time.perf_counter()
            for _ in range(k):
                fn()
                sync()
            times[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(t) for name, t in times.items()}, loops


def peak_bytes(fn):
    """Peak bytes of torch tensors held at once during one call of ``fn``, above what existed before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, out


def measure_memory(fns):
    """Peak memory of each implementation (``{name: callable}``), also as a multiple of its output's size."""
    rows = []
    for name, fn in fns.items():
        fn()  # warm up, so one-off allocations are not counted
        peak, out = peak_bytes(fn)
        out_bytes = out.numel() * out.element_size()
        rows.append({"impl": name, "peak_bytes": peak, "output_bytes": out_bytes, "peak_over_output": peak / out_bytes})
    return rows


def cpu_model():
    """The CPU's model name where the OS tells it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``.

    It matters here: MKL's triangular solve runs several times slower on some CPUs than on others, relative to its GEMM.
    """
    return cpuinfo("model name") or platform.processor() or platform.system()


def _ratio(num, den):
    return None if num is None or den is None else num / den


def _progress(case, dtype_name, fields):
    sizes = " ".join(f"{k}={v:<{WIDTHS.get(k, 3)}d}" for k, v in fields.items())
    return f"{case:15s} {dtype_name} {sizes}"


def run(args, cases):
    """Every case of ``cases`` (registry entries) at each of its sizes and every dtype; returns the result rows and
    the skips, ``{"case: reason": [sizes]}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    skipped = {}
    sync = synchronizer(args.device)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for case in cases:
            for size in case.sizes(args):
                fields = case.fields(size)
                reason = case.skip_reason(size, dtype, args)
                if reason:
                    key = f"{case.name}: {reason}"
                    if key not in skipped:
                        print(f"{case.name:15s} skipped: {reason}", flush=True)
                    skipped.setdefault(key, []).append(f"{dtype_name} {label(fields, ' ')}")
                    continue
                inp = case.inputs(*size, dtype, args.device)
                base = {"case": case.name, "dtype": dtype_name, "device": str(args.device), **fields}
                progress = _progress(case.name, dtype_name, fields)
                if case.kind == "memory":
                    for row in measure_memory(case.build(inp, args)):
                        results.append({**base, "kind": "memory", **row})
                        print(f"{progress} {row['impl']:22s} peak/output = {row['peak_over_output']:.2f}", flush=True)
                    continue
                fns, pairs = case.build(inp, args)
                results += speed_rows(case, fns, pairs, args, sync, base, progress)
    return results, skipped


def speed_rows(case, fns, pairs, args, sync, base, progress):
    """Checks each baseline and the floor against ours, times all of them, and returns a row per baseline."""
    outputs = {name: fn() for name, fn in fns.items()}
    errors = {
        (other, ours): max_rel_error(outputs[ours], outputs[other]) if case.compare else None
        for other, ours in list(pairs.items()) + [("floor", o) for o in FLOOR_VARIANTS if o in fns]
        if other in fns
    }
    medians, loops = time_interleaved(fns, args.rounds, args.min_time, sync)
    floor_s = medians.get("floor")
    rows = []
    for baseline, ours in pairs.items():
        # The floor validates nothing: its ratio is given on the rows of the unvalidated library.
        row_floor_s = floor_s if ours in FLOOR_VARIANTS else None
        row = {
            **base,
            "kind": "speed",
            "baseline": baseline,
            "ours": ours,
            "ours_s": medians[ours],
            "baseline_s": medians[baseline],
            "speedup": medians[baseline] / medians[ours],
            "loops": [loops[ours], loops[baseline]],
            "rounds": args.rounds,
            "max_rel_error": errors[baseline, ours],
            # The hand-written floor, where the case has one: time ratio library / floor (> 1: slower).
            "floor_s": row_floor_s,
            "library_over_floor": _ratio(medians[ours], row_floor_s),
            "floor_max_rel_error": errors.get(("floor", ours)),
        }
        rows.append(row)
        floor_text = ""
        if row_floor_s is not None:
            floor_text = (
                f"  library/floor {row['library_over_floor']:5.2f} "
                f"(floor {row_floor_s * 1e6:.1f} us, max rel. diff {row['floor_max_rel_error']:.1e})"
            )
        print(
            f"{progress} {baseline:20s} "
            f"{ours:13s} {medians[ours] * 1e6:10.1f} us  baseline {medians[baseline] * 1e6:10.1f} us  "
            f"speedup {row['speedup']:7.2f}x  (max rel. diff {row['max_rel_error'] or 0:.1e})" + floor_text,
            flush=True,
        )
    return rows
