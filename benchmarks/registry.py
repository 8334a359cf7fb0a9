"""What a benchmark case is: one :class:`Case` entry of ``cases.REGISTRY``, and the pieces an entry is made of.

An entry names everything the driver (``timing.run``), the report (``report.py``) and the pictures (``plots.py``)
need to know about its case, so that a case is added, changed or removed in one place:

* its **builder**, ``build(inputs, args)``, which returns the timed callables for one size: ``({name: callable},
  {baseline: ours})``, where names starting with ``"ours"`` are this library, ``"floor"`` is the hand-written floor
  (compared with every ``ours`` of ``timing.FLOOR_VARIANTS`` the case has) and every other name is a baseline, paired
  with the ``ours`` it is compared with and timed against (a memory case returns ``{implementation: callable}``);
* its **inputs**, ``inputs(*size, dtype, device)``, drawn once per size and handed to the builder (one matrix and
  ``N`` points, ``builders.make_inputs``, unless the entry says otherwise);
* its **sizes**: the ``--d`` x ``--n`` grid (``grid``), or its own (``sizes_option``), with their names
  (``size_names``, ``("d", "N")`` unless the entry says otherwise; they are the keys of the result rows);
* its **skip rules**, each ``rule(size, dtype, args)`` returning why a size is skipped (a device, a size, a feature
  the library lacks) or ``None``; the first reason given is reported;
* its **targets** (:class:`Target`): minimum speedups, maximum library / floor ratios and maximum peak memory;
* its **family** (:class:`Family`): the report's section and the picture it is drawn in;
* the command-line **options** (:class:`Option`) only it reads; ``run.py`` adds each option once.
"""

import argparse
import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import torch
from builders import make_inputs

Size = tuple[int, ...]
SkipRule = Callable[[Size, torch.dtype, argparse.Namespace], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Family:
    """A section of the report and one picture (``<name>.png``): the cases that name it, in the registry's order.

    Each panel and table puts ``x`` along its axis (a table column per value); a line of a panel or a row of a table
    is one value of the case's other sizes.
    """

    name: str
    title: str  # markdown
    x: str = "N"


@dataclasses.dataclass(frozen=True)
class Target:
    """In float32: ``kind`` ``"speedup"``: baseline ``of`` / ours >= ``bound`` (torch with default validation where
    ``of`` is ``"torch"``); ``"floor"``: ours ``of`` / floor <= ``bound``; ``"memory"``: peak of ``of`` / output
    <= ``bound``."""

    kind: str
    of: str
    size: Size
    bound: float


def speedup(baseline: str, size: Size, bound: float) -> Target:
    return Target("speedup", baseline, size, bound)


def over_floor(ours: str, size: Size, bound: float) -> Target:
    return Target("floor", ours, size, bound)


def peak_memory(implementation: str, size: Size, bound: float) -> Target:
    return Target("memory", implementation, size, bound)


@dataclasses.dataclass(frozen=True)
class Option:
    """A command-line option read by one or more cases' builders, sizes or skip rules.

    ``default`` is its value when not given, ``quick`` the value under ``--quick`` where it differs.
    """

    flag: str
    help: Optional[str] = None
    default: Any = None
    quick: Any = None
    type: Optional[Callable[[str], Any]] = None
    nargs: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        extra = {k: v for k, v in (("type", self.type), ("nargs", self.nargs)) if v is not None}
        parser.add_argument(self.flag, default=None, help=self.help, **extra)

    def resolve(self, args: argparse.Namespace) -> None:
        """Sets the option's default on ``args`` where the command line did not give it."""
        if getattr(args, self.dest) is None:
            setattr(args, self.dest, self.quick if args.quick and self.quick is not None else self.default)


def parse_sizes(texts: list[str]) -> list[Size]:
    """``["8x1", "1024x16x256"]`` -> ``[(8, 1), (1024, 16, 256)]``."""
    return [tuple(int(v) for v in t.lower().split("x")) for t in texts]


def grid(args: argparse.Namespace) -> list[Size]:
    """``--d`` x ``--n``, then the ``--extra-sizes`` not already in it."""
    sizes = [(d, n) for d in args.d for n in args.n]
    for size in parse_sizes(args.extra_sizes):
        if size not in sizes:
            sizes.append(size)
    return sizes


def sizes_option(dest: str) -> Callable[[argparse.Namespace], list[Size]]:
    """The sizes given by an option (e.g. ``--compiled-sizes``: ``dest`` ``"compiled_sizes"``)."""
    return lambda args: parse_sizes(getattr(args, dest))


def cpu_only(size: Size, dtype: torch.dtype, args: argparse.Namespace) -> Optional[str]:
    return "CPU only" if torch.device(args.device).type != "cpu" else None


def requires(available: Callable[[], bool], reason: str) -> SkipRule:
    """Skips every size, with ``reason``, while ``available()`` is false (a feature of the library)."""
    return lambda size, dtype, args: None if available() else reason


def over_bytes(entries: Callable[..., int], reason: str) -> SkipRule:
    """Skips sizes whose largest tensor, ``entries(*size)`` entries of the dtype, is over ``--max-matrix-bytes``."""

    def rule(size, dtype, args):
        return reason if entries(*size) * (torch.finfo(dtype).bits // 8) > args.max_matrix_bytes else None

    return rule


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case; see the module's docstring."""

    name: str
    family: Optional[Family]  # None: the memory case, which has its own table and no picture
    build: Callable[[Any, argparse.Namespace], Any]
    inputs: Callable[..., Any] = make_inputs
    sizes: Callable[[argparse.Namespace], list[Size]] = grid
    size_names: tuple[str, ...] = ("d", "N")
    skip: tuple[SkipRule, ...] = ()
    targets: tuple[Target, ...] = ()
    options: tuple[Option, ...] = ()
    kind: str = "speed"  # "memory": peak memory of each implementation, as a multiple of its output's size
    compare: bool = True  # False: nothing to compare before timing (SVI steps draw different samples)

    def skip_reason(self, size: Size, dtype: torch.dtype, args: argparse.Namespace) -> Optional[str]:
        """The first reason a skip rule gives for ``size``, or ``None``."""
        return next((r for r in (rule(size, dtype, args) for rule in self.skip) if r), None)

    def fields(self, size: Size) -> dict[str, int]:
        """``{"d": 8, "N": 1}``: the size as the result rows give it."""
        return dict(zip(self.size_names, size))

    def size_of(self, row: dict) -> Size:
        return tuple(row[name] for name in self.size_names)


def label(fields: dict[str, int], sep: str = ", ") -> str:
    """``"d=8, N=1"``."""
    return sep.join(f"{k}={v}" for k, v in fields.items())


class Section(NamedTuple):
    """A family with its cases, in the registry's order, and their size names."""

    family: Family
    cases: tuple[str, ...]
    size_names: tuple[str, ...]


def sections(registry: dict[str, Case]) -> list[Section]:
    """The registry's families in the order of their first case."""
    found: dict[str, Section] = {}
    for case in registry.values():
        if case.family is None:
            continue
        name = case.family.name
        if name in found:
            if found[name].size_names != case.size_names:
                raise ValueError(f"{case.name} has other sizes than the rest of family {name!r}")
            found[name] = found[name]._replace(cases=found[name].cases + (case.name,))
        else:
            found[name] = Section(case.family, (case.name,), case.size_names)
    return list(found.values())


def options(registry: dict[str, Case]) -> list[Option]:
    """Every case's options, each once, in the registry's order; two cases may share an option, not its flag."""
    found: dict[str, Option] = {}
    for case in registry.values():
        for option in case.options:
            if found.setdefault(option.flag, option) != option:
                raise ValueError(f"{case.name} defines {option.flag} otherwise than an earlier case")
    return list(found.values())
