"""Which route the library's float32 triangular solves (``d <= 128`` on the CPU) take during a benchmark run.

``torch_mvn_ext._factor._solve_rows`` solves from the right on CPUs where MKL does that faster (AMD), from the left
elsewhere; it reads the module constant ``_RIGHT_SOLVE_IS_FASTER`` at every call, so a run can force either route
and show each one's speed on the machine at hand (``--solve-route`` of ``run.py``, the per-route cells of
``check.py``).
"""

import contextlib

from torch_mvn_ext import _factor

ROUTES = ("auto", "left", "right")
AUTO_IS_RIGHT = _factor._RIGHT_SOLVE_IS_FASTER  # this machine's choice, read once at import


def set_solve_route(route):
    """Make the library's float32 solves take ``route`` (``"auto"``: this machine's choice); returns a description
    for the report's metadata, e.g. ``"auto (right)"``."""
    if route not in ROUTES:
        raise ValueError(f"solve route must be one of {ROUTES}, got {route!r}")
    right = AUTO_IS_RIGHT if route == "auto" else route == "right"
    _factor._RIGHT_SOLVE_IS_FASTER = right
    taken = "right" if right else "left"
    return f"auto ({taken})" if route == "auto" else taken


@contextlib.contextmanager
def solve_route(route):
    """``set_solve_route(route)`` inside the block, the previous route restored after it."""
    before = _factor._RIGHT_SOLVE_IS_FASTER
    try:
        yield set_solve_route(route)
    finally:
        _factor._RIGHT_SOLVE_IS_FASTER = before
