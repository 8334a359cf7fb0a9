r"""Argument checks: an error that names what is wrong, at a cost that fits every call.

Value checks read data, so each is one fused reduction and one read-back, and none runs unless ``validate_args``
asks for it; shape, dtype and device checks are pure Python. Under ``torch.func`` transforms and
``torch.jit.trace`` the checks use the mechanisms torch's own distributions use there.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from ._shapes import broadcast_shapes, format_shape

PARAMETRIZATIONS = ("covariance_matrix", "precision_matrix", "scale_tril")
WRT = ("value", "loc") + PARAMETRIZATIONS
LAYOUTS = ("full", "vech")
REDUCTIONS = ("none", "sum")

F = TypeVar("F", bound=Callable[..., Any])

# Private torch APIs, each with a fallback. ``torch._C._are_functorch_transforms_active`` (torch >= 2.0) tells
# whether a torch.func transform is running; torch has no public equivalent. ``torch._is_all_true`` (torch >= 2.1)
# is ``Tensor.all`` with a vmap batching rule that holds when every batch member holds; torch's own distributions
# check their arguments with it.
_transforms_active: Callable[[], bool] = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_is_all_true: Callable[[Tensor], Tensor] = getattr(torch, "_is_all_true", torch.all)


def _forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (its module-level counter, private; where it is
    missing, assume one is)."""
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


def differentiated(t: Tensor) -> bool:
    """Whether a result computed from ``t`` may be differentiated: autograd records it, a ``torch.func`` transform
    runs, or forward-mode AD is on. Routes whose derivative rules torch gets wrong are taken only when not."""
    return (t.requires_grad and torch.is_grad_enabled()) or _transforms_active() or _forward_ad_active()


def quiet_under_jit_trace(method: F) -> F:
    """Runs ``method`` (of a distribution, or a function of distributions) with ``torch.jit.TracerWarning`` silenced
    while ``torch.jit.trace`` records it (Pyro's ``JitTrace_ELBO``, ``HMC``/``NUTS`` with ``jit_compile=True``).

    Under a trace, sizes are tensors, and each Python comparison of them (broadcasting, grouping samples, argument
    shapes) warns that the trace keeps its outcome as a constant: those branches depend on shapes only, which a
    trace fixes anyway, as torch's own ``MultivariateNormal`` assumes. The value checks of ``validate_args`` run
    while the trace records, and raise then, as torch's do; the traced function does not repeat them. Methods that
    read indices from data (``marginal``, ``condition``) are not wrapped: a trace keeps those values, and says so.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.jit.is_tracing():
            return method(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def all_true(condition: Tensor) -> bool:
    """``bool(condition.all())`` for a boolean tensor, also inside ``torch.func`` transforms: under ``vmap`` it holds
    when it holds for every batch member."""
    if _transforms_active():
        return bool(_is_all_true(condition))
    return bool(condition) if condition.dim() == 0 else bool(condition.all())


def all_equal(a: Tensor, b: Tensor) -> bool:
    """``torch.equal(a, b)`` for two tensors of one shape (one fused comparison), also inside ``torch.func``
    transforms, which have no batching rule for it."""
    if _transforms_active():
        return all_true(a == b)
    return torch.equal(a, b)


def check_choice(arg: str, value: object, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_wrt(wrt: object, allowed: Sequence[str] = WRT) -> tuple[str, ...]:
    names = (wrt,) if isinstance(wrt, str) else wrt
    if not isinstance(names, (tuple, list)) or not names:
        raise ValueError(f"wrt must be one of {', '.join(map(repr, allowed))} or a tuple/list of them; got {wrt!r}")
    for name in names:
        check_choice("wrt", name, allowed)
    return tuple(names)


def check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on device {t.device} but the distribution is on device {device}")


def check_parameters(
    loc: object, covariance_matrix: object, precision_matrix: object, scale_tril: object
) -> tuple[str, Tensor, torch.Size]:
    """The name and tensor of the one matrix argument given and the batch shape, after checking every structural
    requirement: a straight line of cheap tests when they hold (every construction pays them), the diagnosis when
    one fails."""
    if precision_matrix is None and scale_tril is None and covariance_matrix is not None:
        name, matrix = "covariance_matrix", covariance_matrix
    elif covariance_matrix is None and precision_matrix is None and scale_tril is not None:
        name, matrix = "scale_tril", scale_tril
    elif covariance_matrix is None and scale_tril is None and precision_matrix is not None:
        name, matrix = "precision_matrix", precision_matrix
    else:
        matrices = (covariance_matrix, precision_matrix, scale_tril)
        given = [n for n, m in zip(PARAMETRIZATIONS, matrices) if m is not None]
        got = " and ".join(given) if given else "none"
        raise ValueError(f"Exactly one of covariance_matrix, precision_matrix or scale_tril must be given; got {got}")
    if isinstance(loc, Tensor) and isinstance(matrix, Tensor):
        dtype, ls, ms = loc.dtype, loc.shape, matrix.shape
        if (
            (dtype is torch.float32 or dtype is torch.float64)
            and matrix.dtype is dtype
            and len(ls) >= 1
            and len(ms) >= 2
            and ms[-1] == ms[-2] == ls[-1]
            and loc.device == matrix.device
        ):
            batch = ls[:-1]
            if len(ms) > 2 or batch:
                try:
                    batch = broadcast_shapes(batch, ms[:-2])
                except RuntimeError:
                    pass
                else:
                    return name, matrix, batch
            else:
                return name, matrix, batch
    raise _parameter_error(loc, name, matrix)


def _parameter_error(loc: object, name: str, matrix: object) -> ValueError:
    """The ``ValueError`` that says which structural requirement ``loc`` and ``matrix`` fail."""
    for arg, t in (("loc", loc), (name, matrix)):
        if not isinstance(t, Tensor):
            return ValueError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            return ValueError(f"{arg} has dtype {t.dtype}, but JacobianMVN needs floating-point tensors")
        if t.dtype not in (torch.float32, torch.float64):
            return ValueError(
                f"{arg} has dtype {t.dtype}, but JacobianMVN works in float32 or float64 (torch's Cholesky "
                f"factorization and triangular solves do not support {t.dtype}); convert with .float()"
            )
    loc, matrix = cast(Tensor, loc), cast(Tensor, matrix)
    if loc.dim() < 1:
        return ValueError("loc must be at least one-dimensional, with its event dimension last; got a 0-d tensor")
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        return ValueError(
            f"{name} must be a square matrix (with optional leading batch dimensions), "
            f"but has shape {format_shape(matrix.shape)}"
        )
    if matrix.shape[-1] != loc.shape[-1]:
        return ValueError(
            f"loc has shape {format_shape(loc.shape)} but {name} has shape {format_shape(matrix.shape)}: "
            f"their event sizes {loc.shape[-1]} and {matrix.shape[-1]} differ"
        )
    try:
        broadcast_shapes(loc.shape[:-1], matrix.shape[:-2])
    except RuntimeError:
        return ValueError(
            f"loc has shape {format_shape(loc.shape)} and {name} has shape {format_shape(matrix.shape)}: "
            f"their batch shapes {format_shape(loc.shape[:-1])} and {format_shape(matrix.shape[:-2])} "
            f"do not broadcast"
        )
    if loc.dtype != matrix.dtype:
        return ValueError(
            f"loc has dtype {loc.dtype} but {name} has dtype {matrix.dtype}; pass both in one dtype "
            f"(e.g. loc.to({name}.dtype))"
        )
    return ValueError(f"loc is on device {loc.device} but {name} is on device {matrix.device}")


def check_event_tensor(
    name: str,
    t: object,
    event_shape: torch.Size,
    batch_shape: torch.Size,
    device: torch.device,
    what: str = "the distribution's event shape",
) -> torch.Size:
    """Checks that ``t`` is a tensor on ``device`` (the distribution's) ending in ``event_shape`` (``what``) whose
    batch broadcasts with ``batch_shape``; returns the broadcast batch shape."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(name, t, device)
    n = len(event_shape)
    if t.dim() < n or t.shape[t.dim() - n :] != event_shape:
        raise ValueError(
            f"{name} has shape {format_shape(t.shape)} but must end in {format_shape(event_shape)} ({what})"
        )
    try:
        return broadcast_shapes(t.shape[: t.dim() - n], batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {format_shape(t.shape)}, whose batch shape {format_shape(t.shape[: t.dim() - n])} "
            f"does not broadcast with the distribution's batch_shape {format_shape(batch_shape)}"
        ) from None


def is_finite(value: Tensor) -> bool:
    """Whether every entry is finite: one reduction and one read-back first (a sum is finite when every entry is,
    barring overflow, which the elementwise check then clears)."""
    return all_true(torch.isfinite(value.sum())) or all_true(torch.isfinite(value))


def check_finite(name: str, value: Tensor) -> None:
    if not is_finite(value):
        raise ValueError(f"{name} contains NaN or infinite entries:\n{value}")


def check_out(out: object, shape: torch.Size, like: Tensor, what: str) -> Tensor:
    """``out=`` as torch's ``out=`` arguments take it, but strict: a tensor of exactly the result's shape, dtype and
    device (nothing is resized); ``ValueError`` naming what was expected otherwise."""
    if not isinstance(out, Tensor):
        raise ValueError(f"out for {what} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out for {what} must have shape {format_shape(shape)}, dtype {like.dtype} and device {like.device}; "
            f"got shape {format_shape(out.shape)}, dtype {out.dtype} and device {out.device}"
        )
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"out for {what} requires grad: pass a tensor that does not, as torch's out= arguments need")
    return out


def check_allocation(shape: Sequence[int], like: Tensor, what: str) -> None:
    """A ``ValueError`` before allocating a tensor of ``shape`` (in ``like``'s dtype, on its device) that is larger
    than the device's memory, so that the caller gets an error instead of an allocation that cannot succeed (or a
    process killed for memory)."""
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type == "cuda":
        total = torch.cuda.get_device_properties(like.device).total_memory
    elif like.device.type == "cpu" and hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    if nbytes > total:
        raise ValueError(
            f"{what} has shape {format_shape(shape)} ({nbytes / 2**30:.1f} GiB in {like.dtype}), more than the "
            f"{total / 2**30:.1f} GiB of memory of device {like.device}"
        )


def validate_parameter(name: str, value: Tensor, constraint: constraints.Constraint) -> None:
    if not _satisfies(constraint, value):
        raise ValueError(
            f"Expected parameter {name} (Tensor of shape {format_shape(value.shape)}) of distribution "
            f"JacobianMVN to satisfy the constraint {constraint!r}, but found invalid values:\n{value}"
        )


def _satisfies(constraint: constraints.Constraint, value: Tensor) -> bool:
    """``constraint.check(value).all()``, with the same verdict (NaN fails) in 2-3x fewer operations for the
    constraints checked at every construction."""
    if constraint is constraints.lower_cholesky:
        return all_true(value.diagonal(dim1=-2, dim2=-1).gt(0)) and all_equal(value.tril(), value)
    if constraint is constraints.real_vector:
        return all_true(value == value)
    return all_true(constraint.check(value))


def check_value(dist: Distribution, value: object) -> Tensor:
    """``value`` checked as torch's ``_validate_sample`` checks it (finite too, under ``validate_args``), in the
    distribution's dtype (that of its ``loc``)."""
    loc: Tensor = dist.loc  # type: ignore[attr-defined]
    if not isinstance(value, Tensor):
        raise ValueError(f"value must be a torch.Tensor, got {type(value).__name__}")
    # torch's own attributes behind the batch_shape and event_shape properties: a call fewer each, at every call
    shape, batch_shape, event_shape = value.shape, dist._batch_shape, dist._event_shape
    if not shape or shape[-1] != event_shape[0]:
        raise ValueError(
            f"value has shape {format_shape(shape)} but the distribution's event shape is "
            f"{format_shape(event_shape)}: the last dimension of value must be {event_shape[0]}"
        )
    if batch_shape and shape[:-1] != batch_shape:
        try:
            broadcast_shapes(shape[:-1], batch_shape)
        except RuntimeError:
            raise ValueError(
                f"value has shape {format_shape(shape)}, which does not broadcast with the distribution's "
                f"batch_shape + event_shape {format_shape(batch_shape + event_shape)}"
            ) from None
    if value.device != loc.device:
        check_device("value", value, loc.device)
    if dist._validate_args and not is_finite(value):
        # The shape checks above and finiteness cover torch's _validate_sample (support real_vector: no NaN).
        raise ValueError(
            f"Expected value argument (Tensor of shape {tuple(shape)}) to be within the support "
            f"({dist.support!r}) of the distribution {dist!r}, but found invalid values: value contains NaN or "
            f"infinite entries:\n{value}"
        )
    return value if value.dtype is loc.dtype else value.to(loc.dtype)
