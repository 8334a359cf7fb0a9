"""kl_divergence with a JacobianMVN side: gradients against autograd through the dense reference, and torch.compile."""

import pytest
import torch
from kl_cases import PAIR_IDS, PAIRS, build, random_params, reference_kl
from torch.distributions import kl_divergence

D = 3
COMPILE_PAIRS = [
    ("JacobianMVN-covariance_matrix", "JacobianMVN-precision_matrix"),
    ("JacobianMVN-precision_matrix", "JacobianMVN-scale_tril"),
    ("JacobianMVN-scale_tril", "LowRankMultivariateNormal"),
    ("Independent(Normal)", "JacobianMVN-precision_matrix"),
]


def _comparable(name, grad):
    # Only the lower triangle of scale_tril is a parameter: the dense reference L L^T also reads the zeros above it.
    return grad.tril() if name == "scale_tril" else grad


@pytest.mark.parametrize("p_kind, q_kind", PAIRS, ids=PAIR_IDS)
def test_gradients_match_autograd_through_dense_reference(p_kind, q_kind, assert_close):
    p_params, q_params = random_params(p_kind, (2, 1), D), random_params(q_kind, (3,), D)
    names = [*p_params, *q_params]
    leaves = [*p_params.values(), *q_params.values()]
    ours = torch.autograd.grad(kl_divergence(build(p_kind, p_params), build(q_kind, q_params)).sum(), leaves)
    reference = torch.autograd.grad(reference_kl(p_kind, p_params, q_kind, q_params).sum(), leaves)
    for name, a, b in zip(names, ours, reference):
        assert_close(_comparable(name, a), _comparable(name, b))


@pytest.mark.slow
def test_compile_fullgraph(assert_close):
    """One graph, no break, for a function that builds the distributions and takes their KL divergences.

    The eager call comes first: on the first call for a new pair of types, torch's ``kl_divergence`` runs its
    dispatcher (``_dispatch_kl``), which dynamo cannot trace for any registration; once memoized, the lookup is
    a dict access and the whole computation, ours, traces into one graph.
    """
    params = [(random_params(p, (2, 1), D), random_params(q, (3,), D)) for p, q in COMPILE_PAIRS]
    leaves = [t for pair in params for side in pair for t in side.values()]

    def kls(params):
        return [
            kl_divergence(build(p, p_params, validate_args=False), build(q, q_params, validate_args=False))
            for (p, q), (p_params, q_params) in zip(COMPILE_PAIRS, params)
        ]

    eager = kls(params)
    compiled = torch.compile(kls, fullgraph=True, backend="aot_eager")(params)
    for a, b in zip(compiled, eager):
        assert_close(a, b)
    eager_grads = torch.autograd.grad(sum(kl.sum() for kl in eager), leaves)
    compiled_grads = torch.autograd.grad(sum(kl.sum() for kl in compiled), leaves)
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b)
