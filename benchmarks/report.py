"""The benchmark's report: the targets checked, markdown tables per family of cases, and their reStructuredText.

Each family (``registry.Family``) gets a section with its picture (``plots.py``) and, per dtype, a table of the
speedups (a row per case, baseline and value of the sizes other than the family's ``x``; a column per value of
``x``) and, where its cases have a floor, a table of library / floor; narrow enough for the page.
"""

import re

from registry import label

# The kinds of targets, in the order they are listed: the label, the requirement, whether the bound is a maximum.
TARGET_KINDS = {
    "speedup": ("{case} vs {of}, {where}", ">= {bound:g}x", False),
    "floor": ("{case}, {of} / floor, {where}", "<= {bound:g}x", True),
    "memory": ("peak memory of {of}, {where}", "<= {bound:g}x output", True),
}


def check_targets(results, registry):
    """Every target of the registry's cases (``registry.Target``), checked against the float32 results: speedups,
    then library / floor ratios, then peak memory; a target whose size was not run is "n/a"."""
    measured = {kind: {} for kind in TARGET_KINDS}
    for r in results:
        if r["dtype"] != "float32" or r["case"] not in registry:
            continue
        size = registry[r["case"]].size_of(r)
        if r["kind"] == "speed":
            measured["speedup"][r["case"], r["baseline"], size] = r["speedup"]
            measured["floor"][r["case"], r["ours"], size] = r["library_over_floor"]
        else:
            measured["memory"][r["case"], r["impl"], size] = r["peak_over_output"]
    checks = []
    for kind, (text, required, at_most) in TARGET_KINDS.items():
        for case in registry.values():
            for t in (t for t in case.targets if t.kind == kind):
                value = measured[kind].get((case.name, t.of, t.size))
                target = text.format(case=case.name, of=t.of, where=label(case.fields(t.size)))
                checks.append((target, required.format(bound=t.bound), value, t.bound, at_most))
    return [
        {
            "target": target,
            "required": required,
            "measured": None if value is None else round(value, 3 if target.startswith("peak") else 2),
            "met": None if value is None else (value <= bound if at_most else value >= bound),
        }
        for target, required, value, bound, at_most in checks
    ]


def _fmt(v, digits=1):
    return "—" if v is None else f"{v:.{digits}f}"


def _table(header, rows):
    return (
        ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        + ["| " + " | ".join(row) + " |" for row in rows]
        + [""]
    )


def family_tables(rows, cases, x="N", size_names=("d", "N")):
    """Markdown tables of one family's speed rows, per dtype: the speedups (a row per case, baseline and value of the
    other sizes) and, where the case has a floor, library / floor (a row per case and value of the other sizes); a
    column per value of ``x`` measured, so that each table stays narrow enough for the page."""
    lines = []
    several = len({r["case"] for r in rows}) > 1
    others = [name for name in size_names if name != x]
    for dtype in sorted({r["dtype"] for r in rows}):
        mine = [r for r in rows if r["dtype"] == dtype]
        baselines = list(dict.fromkeys(r["baseline"] for r in mine))
        keys = sorted(
            {(r["case"], r["baseline"], *(r[k] for k in others)) for r in mine},
            key=lambda k: (cases.index(k[0]), baselines.index(k[1]), *k[2:]),
        )
        xs = sorted({r[x] for r in mine})
        cells = {(r["case"], r["baseline"], *(r[k] for k in others), r[x]): r["speedup"] for r in mine}
        head = (["case"] if several else []) + ["baseline", *others]
        body = [
            ([key[0]] if several else [])
            + [key[1], *map(str, key[2:])]
            + [_fmt(cells.get((*key, v))) + ("x" if (*key, v) in cells else "") for v in xs]
            for key in keys
        ]
        lines += [f"### Speedup, {dtype}", ""] + _table(head + [f"{x}={v}" for v in xs], body)
        floors = {
            (r["case"], *(r[k] for k in others), r[x]): r["library_over_floor"]
            for r in mine
            if r["library_over_floor"] is not None
        }
        if floors:
            fkeys = sorted({k[:-1] for k in floors}, key=lambda k: (cases.index(k[0]), *k[1:]))
            fxs = sorted({k[-1] for k in floors})
            body = [
                ([key[0]] if several else []) + [*map(str, key[1:])] + [_fmt(floors.get((*key, v)), 2) for v in fxs]
                for key in fkeys
            ]
            head = (["case"] if several else []) + others
            lines += [f"### library / floor, {dtype}", ""] + _table(head + [f"{x}={v}" for v in fxs], body)
    return lines


def markdown(results, targets, meta, skipped, sections, pictures=None):
    """The report in markdown, a section per family of ``sections`` (``registry.sections``) with results;
    ``pictures`` maps a family's file name to the path of its picture, as the report should link it (no pictures
    without it)."""
    pictures = pictures or {}
    lines = [
        "Speedup = median time of the baseline / median time of torch_mvn_ext (> 1: torch_mvn_ext is faster). "
        "library / floor = median time of torch_mvn_ext without validation (on the rows of the unvalidated or "
        "compiled library) / median time of the hand-written "
        "closed form (> 1: torch_mvn_ext is slower than the floor).",
        "",
        f"Machine: {meta['machine']}, device {meta['device']}; torch {meta['torch']}, {meta['threads']} threads; "
        f"{meta['rounds']} interleaved rounds. Command: `{meta['command']}`",
        "",
    ]
    if meta.get("load_average"):
        start, end = meta["load_average"]
        lines += [
            f"Load average of the machine (1 minute): {start:.1f} at the start, {end:.1f} at the end; other processes "
            f"running alongside take time from the timed calls and make the ratios noisier.",
            "",
        ]
    speed = [r for r in results if r["kind"] == "speed"]
    for family, cases, size_names in sections:
        rows = [r for r in speed if r["case"] in cases]
        if not rows:
            continue
        lines += [f"## {family.title}", ""]
        if family.name in pictures:
            lines += [f"![speedups and library / floor, {family.name}]({pictures[family.name]})", ""]
        lines += family_tables(rows, cases, family.x, size_names)
    memory = [r for r in results if r["kind"] == "memory"]
    if memory:
        lines += ["## Peak memory of the matrix Jacobians (multiple of the N x d x d output)", ""]
        body = [
            [
                r["dtype"],
                str(r["d"]),
                str(r["N"]),
                r["impl"],
                f"{r['peak_over_output']:.2f}",
                f"{r['peak_bytes'] / 2**20:.1f}",
            ]
            for r in memory
        ]
        lines += _table(["dtype", "d", "N", "implementation", "peak / output", "peak (MiB)"], body)
    if targets:
        lines += ["## Targets (float32; torch and the library with default validation)", ""]
        body = [
            [
                t["target"],
                t["required"],
                _fmt(t["measured"], 2),
                "n/a" if t["met"] is None else ("yes" if t["met"] else "no"),
            ]
            for t in targets
        ]
        lines += _table(["target", "required", "measured", "met"], body)
    if skipped:
        lines += ["## Skipped", ""]
        for reason, where in skipped.items():
            lines.append(f"- {reason} ({', '.join(where)})")
        lines.append("")
    return "\n".join(lines)


def markdown_to_rst(text):
    """The report in reStructuredText, for the reference (``docs/performance.rst`` includes it under its "Results"
    section): ``##`` headings become subsections (``~``), ``###`` rubrics, pipe tables list-tables, ``![alt](path)``
    images; other lines stay as they are."""
    out, table = [], []

    def flush():
        if not table:
            return
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
        rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]  # the separator row
        out.extend(["", ".. list-table::", "   :header-rows: 1", ""])
        empty = "\\"  # an empty cell
        for row in rows:
            cells = [cell.replace("`", "``") or empty for cell in row]
            out.extend(f"   {'*' if i == 0 else ' '} - {cell}" for i, cell in enumerate(cells))
        out.append("")
        table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            out.extend(["", f".. image:: {image[2]}", f"   :alt: {image[1]}", ""])
        elif line.startswith("## "):
            title = line[3:].strip().replace("`", "``")
            out.extend(["", title, "~" * len(title), ""])
        elif line.startswith("#"):
            out.extend(["", f".. rubric:: {line.lstrip('#').strip().replace('`', '``')}", ""])
        else:
            out.append(line.replace("`", "``").replace("````", "``"))
    flush()
    return "\n".join(out).strip() + "\n"
