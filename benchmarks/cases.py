r"""The benchmark's cases: ``REGISTRY``, one entry (``registry.Case``) per case, in the order they run and are reported.

Every case times this library ("ours") and one or more baselines on the same inputs, and most also a hand-written
floor (``floors.py``; ``many_small.py`` for its cases). Cases (``--cases``):

* ``lpg``: ``JacobianMVN(loc, covariance_matrix=C).log_prob_and_grads(x, reduction="sum")`` vs torch's
  ``MultivariateNormal(...).log_prob(x)`` + ``torch.autograd.grad`` w.r.t. ``x``, ``loc`` and ``C``, with default
  ``validate_args`` (as users run it) and with ``validate_args=False`` on both sides;
* ``jac_loc``, ``jac_scale_tril``, ``jac_cov``: per-sample ``jacobian(x, wrt)`` vs ``torch.func.vmap(grad)``
  through torch's MVN and, for small ``N``, ``torch.autograd.functional.jacobian`` (loc only);
* ``precision``: precision-parametrized ``log_prob`` vs torch's MVN built from ``precision_matrix``;
* ``autograd``, ``autograd_tril``: forward + backward through ``log_prob`` w.r.t. ``loc`` and the matrix
  (``covariance_matrix``, resp. ``scale_tril``) vs the same through torch's MVN (their floor: the hand-written
  gradients w.r.t. ``loc`` and the matrix, and ``log_prob``);
* ``compiled``: ``torch.compile(dynamic=False, fullgraph=True)`` of construction +
  ``log_prob_and_grads(x, reduction="sum")`` vs torch's MVN compiled the same way, its gradients taken by
  ``torch.func.grad`` inside the compiled function (this compiles to one graph; autograd of a compiled forward
  would compile a second, backward graph), and vs the eager library; all with ``validate_args=False``; its floor
  is ``lpg``'s, eager. Run at ``--compiled-sizes`` only (compiling takes seconds per size), dynamo reset before each;
* ``out_buffer``: a loop over batches of ``--out-batch`` points calling
  ``d.jacobian(x_batch, "covariance_matrix", out=buf)`` into one preallocated buffer, vs the same loop with a
  fresh output each call (skipped, with a note, by a library whose ``jacobian`` has no ``out`` parameter);
* ``svi``: one ``pyro.infer.SVI`` step (``Trace_ELBO``, Adam) of a model with an MVN latent and ``N`` MVN
  observations, and ``nuts``: a short NUTS run on the same model, each with ``JacobianMVN`` vs Pyro's
  ``dist.MultivariateNormal``;
* ``memory``: peak memory of ``jacobian(x, "scale_tril")`` and ``jacobian(x, "covariance_matrix")`` and of
  ``vmap(grad)`` for the same, as a multiple of the size of the ``N x d x d`` output;
* ``many_small_log_prob``, ``many_small_rsample``, ``many_small_lpg``: B Gaussians, each with its own small matrix
  (``many_small.py``), at ``--many-small-sizes``;
* ``lowrank_lpg``: ``JacobianLowRankMVN(loc, cov_factor, cov_diag).log_prob_and_grads(x, reduction="sum")`` vs
  torch's ``LowRankMultivariateNormal(...).log_prob(x).sum()`` + ``torch.autograd.grad`` w.r.t. ``x``, ``loc``,
  ``cov_factor`` and ``cov_diag``, validated and not, and ``lowrank_jac``: the per-sample
  ``jacobian(x, "cov_factor")`` vs ``vmap(grad)`` through torch's class and, where ``N d k <=
  --lowrank-autograd-max``, ``torch.autograd.functional.jacobian``; at ``--lowrank-sizes`` (``lowrank.py``), and
  skipped, with a note, by a library without ``JacobianLowRankMVN``.

``svi``, ``nuts`` and ``memory`` run on the CPU only and are skipped, with a note, on another device.

Adding a case is adding one ``Case`` to ``REGISTRY``: its name, family, builder (in the module of its kind:
``builders.py``, ``many_small.py``, ``lowrank.py``), and where needed its inputs, sizes, skip rules, targets and
options (``registry.py`` describes each); ``run.py``, the report and the pictures read everything from the entry.
"""

from collections.abc import Callable

import builders
import floors
import lowrank
import many_small
from registry import (
    Case,
    Family,
    Option,
    cpu_only,
    over_bytes,
    over_floor,
    peak_memory,
    requires,
    sizes_option,
    speedup,
)

LPG = Family("lpg", '`log_prob_and_grads(x, reduction="sum")` against torch\'s MVN + autograd (`lpg`)')
JACOBIANS = Family("jacobians", "Per-sample Jacobians against `vmap(grad)` (`jac_loc`, `jac_scale_tril`, `jac_cov`)")
PRECISION = Family("precision", "`log_prob` from a precision matrix (`precision`)")
AUTOGRAD = Family("autograd", "Autograd through `log_prob` (`autograd`, `autograd_tril`)")
COMPILED = Family("compiled", "`torch.compile` (`compiled`)")
OUT_BUFFER = Family("out_buffer", "A reused output buffer, `out=` (`out_buffer`)")
PYRO = Family("pyro", "Pyro: an SVI step and a NUTS run (`svi`, `nuts`)")
MANY_SMALL = Family("many_small", "Many small Gaussians, one matrix per member, B members (`many_small_*`; N is B)")
LOWRANK = Family(
    "lowrank", "Low-rank covariance against `LowRankMultivariateNormal` (`lowrank_lpg`, `lowrank_jac`)", x="d"
)

# Skip rules and options of several cases.
# vmap(grad) materializes N x d x d tensors (per-sample copies of the matrix) for every Jacobian, loc included.
JACOBIAN_BYTES = over_bytes(lambda d, n: n * d * d, "N x d x d tensors over --max-matrix-bytes")
PYRO_OPTIONS = (Option("--pyro-max-n", default=1024, type=int), Option("--pyro-max-d", default=64, type=int))
SMALL_BYTES = over_bytes(lambda d, b: b * d * d, "B x d x d covariances over --max-matrix-bytes")
SMALL_SIZES = Option(
    "--many-small-sizes",
    "dxB points of the many_small cases (default d in 1 2 3 4 6 8, B in 1e3 1e5 1e6; quick 2x1e5 3x1e5)",
    default=many_small.SIZES,
    quick=many_small.QUICK_SIZES,
    nargs="+",
)
NO_LOWRANK = requires(lowrank.has_class, "torch_mvn_ext has no JacobianLowRankMVN in this version of the library")
LOWRANK_SIZES = Option(
    "--lowrank-sizes",
    "dxkxN points of the lowrank cases (default d in 64 1024 4096, k in 4 16 64, N 256; quick 1024x16x256)",
    default=lowrank.SIZES,
    quick=lowrank.QUICK_SIZES,
    nargs="+",
)


# The targets are in float32, torch with default validation where the baseline is "torch". The floor validates
# nothing, so it is compared with the library without validation ("ours_noval"); the validated library's cost is in
# the torch comparisons.
def small_targets(min_speedup):
    """The issue's targets of the many_small cases: at B = 1e5, d = 2 and 3, both sides unvalidated."""
    sizes = [(d, 100_000) for d in (2, 3)]
    return (
        *(speedup("torch_noval", size, min_speedup) for size in sizes),
        *(over_floor("ours_noval", size, 1.3) for size in sizes),
    )


def many_small_case(name: str, build: Callable, minimum: float) -> Case:
    """A case of many small Gaussians: ``build`` on B members with their own matrices, held to ``minimum`` x torch."""
    return Case(
        name,
        MANY_SMALL,
        build,
        inputs=many_small.make_inputs,
        sizes=sizes_option("many_small_sizes"),
        skip=(SMALL_BYTES,),
        targets=small_targets(minimum),
        options=(SMALL_SIZES,),
    )


REGISTRY = {
    case.name: case
    for case in [
        Case(
            "lpg",
            LPG,
            builders.lpg,
            targets=(
                speedup("torch", (8, 1), 5.0),
                speedup("torch", (64, 1024), 2.5),
                speedup("torch", (256, 4096), 1.5),
                over_floor("ours_noval", (8, 1), 1.3),
                over_floor("ours_noval", (64, 1024), 1.3),
            ),
        ),
        Case(
            "jac_loc",
            JACOBIANS,
            builders.jacobian("loc", "scale_tril", floors.jac_loc),
            skip=(JACOBIAN_BYTES,),
            targets=(speedup("vmap_grad", (64, 1024), 50.0),),
            options=(Option("--functional-max", "largest N*d for autograd.functional.jacobian", 64 * 64, type=int),),
        ),
        Case(
            "jac_scale_tril",
            JACOBIANS,
            builders.jacobian("scale_tril", "scale_tril", floors.jac_scale_tril),
            skip=(JACOBIAN_BYTES,),
            targets=(speedup("vmap_grad", (64, 1024), 10.0),),
        ),
        Case(
            "jac_cov",
            JACOBIANS,
            builders.jacobian("covariance_matrix", "covariance_matrix", floors.jac_cov),
            skip=(JACOBIAN_BYTES,),
            targets=(over_floor("ours_noval", (64, 1024), 1.3),),
        ),
        Case("precision", PRECISION, builders.precision, targets=(speedup("torch", (64, 1024), 3.0),)),
        Case(
            "autograd",
            AUTOGRAD,
            builders.autograd("covariance_matrix", floors.autograd),
            targets=(speedup("torch", (64, 1024), 1.5),),
        ),
        Case(
            "autograd_tril",
            AUTOGRAD,
            builders.autograd("scale_tril", floors.autograd_tril),
            targets=(speedup("torch", (64, 1024), 1.5),),
        ),
        Case(
            "compiled",
            COMPILED,
            builders.compiled,
            sizes=sizes_option("compiled_sizes"),
            options=(
                Option(
                    "--compiled-sizes",
                    "dxN points of the compiled case (default 8x1 64x1024)",
                    ["8x1", "64x1024"],
                    nargs="+",
                ),
                Option("--compile-backend", "torch.compile backend of the compiled case", "inductor"),
            ),
        ),
        Case(
            "out_buffer",
            OUT_BUFFER,
            builders.out_buffer,
            skip=(
                requires(
                    builders.has_out_parameter,
                    "JacobianMVN.jacobian has no out= parameter in this version of the library",
                ),
                builders.out_buffer_size,
            ),
            options=(Option("--out-batch", "points per batch in the out_buffer case", 4096, type=int),),
        ),
        Case("svi", PYRO, builders.svi, skip=(cpu_only, builders.pyro_size), options=PYRO_OPTIONS, compare=False),
        Case(
            "nuts",
            PYRO,
            builders.nuts,
            skip=(cpu_only, builders.pyro_size),
            options=(*PYRO_OPTIONS, Option("--nuts-samples", default=10, type=int)),
        ),
        Case(
            "memory",
            None,
            builders.memory,
            kind="memory",
            skip=(cpu_only, JACOBIAN_BYTES, builders.memory_size),
            targets=tuple(
                peak_memory(impl, (64, 1024), 1.5)
                for impl in ("ours_scale_tril", "ours_cov", "ours_cov_vech", "ours_scale_tril_vech")
            ),
            options=(Option("--memory-min-n", "smallest N for the memory case", 1024, type=int),),
        ),
        many_small_case("many_small_log_prob", many_small.log_prob, 5.0),
        many_small_case("many_small_rsample", many_small.rsample, 3.0),
        many_small_case("many_small_lpg", many_small.lpg, 5.0),
        Case(
            "lowrank_lpg",
            LOWRANK,
            lowrank.lpg,
            inputs=lowrank.make_inputs,
            sizes=sizes_option("lowrank_sizes"),
            size_names=("d", "k", "N"),
            skip=(NO_LOWRANK,),
            targets=(speedup("torch", (1024, 16, 256), 1.1),),
            options=(LOWRANK_SIZES,),
        ),
        Case(
            "lowrank_jac",
            LOWRANK,
            lowrank.jacobian,
            inputs=lowrank.make_inputs,
            sizes=sizes_option("lowrank_sizes"),
            size_names=("d", "k", "N"),
            skip=(NO_LOWRANK, over_bytes(lambda d, k, n: n * d * k, "N x d x k tensors over --max-matrix-bytes")),
            targets=(speedup("vmap_grad", (1024, 16, 256), 8.0),),
            options=(
                LOWRANK_SIZES,
                Option("--lowrank-autograd-max", "largest N*d*k for lowrank_jac's autograd baseline", 2**20, type=int),
            ),
        ),
    ]
}
