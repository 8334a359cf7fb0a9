"""The benchmark's pictures: one PNG per family of cases (``registry.Family``), if matplotlib is installed.

A picture has a panel per case and baseline (the speedup) and per case with a floor (``library / floor``), against
the family's ``x`` (``N`` unless the family says otherwise), a line per value of the other sizes (colour) and dtype
(line style); the grey line is parity.
"""

import math
import os


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_family(plt, rows, cases, title, path, x="N", size_names=("d", "N")):
    """One picture of a family's speed ``rows`` (see the module's docstring), written to ``path``."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    others = tuple(name for name in size_names if name != x)

    def line(r):
        return tuple(r[k] for k in others)

    panels = {}
    for r in sorted(rows, key=lambda r: cases.index(r["case"])):
        key = (f"{r['case']} vs {r['baseline']}", "speedup")
        panels.setdefault(key, {}).setdefault((r["dtype"], line(r)), {})[r[x]] = r["speedup"]
    for r in rows:
        if r["library_over_floor"] is not None:
            key = (f"{r['case']}: library / floor", "library / floor")
            panels.setdefault(key, {}).setdefault((r["dtype"], line(r)), {})[r[x]] = r["library_over_floor"]
    lines = sorted({line(r) for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    colors = {v: f"C{i}" for i, v in enumerate(lines)}
    styles = dict(zip(["float32", "float64"], ["-", "--"]))
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.7 * nrows + 0.5), squeeze=False)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, ((label, ylabel), series) in zip(axes.flat, panels.items()):
        values = [v for points in series.values() for v in points.values()]
        for (dtype, value), points in sorted(series.items()):
            xs = sorted(points)
            ax.plot(xs, [points[v] for v in xs], styles.get(dtype, ":"), color=colors[value], marker="o", ms=3)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        xs = sorted({v for points in series.values() for v in points})
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        if max(values) / min(values) > 3:  # a log axis for ratios over a wide range
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [
        Line2D([], [], color=colors[v], marker="o", ms=3, label=", ".join(f"{k}={n}" for k, n in zip(others, v)))
        for v in lines
    ]
    handles += [Line2D([], [], color="black", ls=styles.get(t, ":"), label=t) for t in dtypes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title.replace("`", ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def clear_pictures(folder, sections):
    """Makes ``folder`` and removes the pictures of an earlier run of every family of ``sections`` from it (nothing
    else), whether this run has results for the family or not."""
    os.makedirs(folder, exist_ok=True)
    for section in sections:
        path = os.path.join(folder, f"{section.family.name}.png")
        if os.path.exists(path):
            os.remove(path)


def write_pictures(plt, results, folder, sections):
    """A PNG per family of ``sections`` (``registry.sections``) with results into ``folder`` (see
    :func:`clear_pictures`); returns ``{family: file name}``."""
    clear_pictures(folder, sections)
    speed = [r for r in results if r["kind"] == "speed"]
    written = {}
    for family, cases, size_names in sections:
        rows = [r for r in speed if r["case"] in cases]
        if rows:
            name = family.name
            plot_family(plt, rows, cases, family.title, os.path.join(folder, f"{name}.png"), family.x, size_names)
            written[name] = f"{name}.png"
    return written
