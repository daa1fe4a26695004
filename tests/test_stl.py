"""The closed-form STL score of masked autoregressive flows against autograd's batched one."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko
from torch import nn

import pyro_flowguide as pfg
from pyro_flowguide.guides import posterior, stl
from pyro_flowguide.flows import SplineMAF


def _guide(flow, dim, dtype=torch.float64, **hyper):
    pyro.clear_param_store()

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(dim, dtype=dtype), 1.0).to_event(1))

    guide = pfg.AutoFlowGuide(model, flow=flow, **hyper)
    guide()
    return guide


def _perturb(lazy, seed=0):
    """A flow away from the identity: random output layers (they start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lazy.transforms:
            last = list(layer.hyper)[-1]
            last.weight.copy_(0.2 * torch.randn(last.weight.shape, generator=gen))
            last.bias.copy_(0.5 * torch.randn(last.bias.shape, generator=gen))


@pytest.mark.parametrize("flow", ["SplineMAF", "MAF", "NSF"])
@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(7,), (3, 2)])
def test_closed_form_score_matches_autograd(flow, dim, dtype, batch):
    guide = _guide(flow, dim, dtype)
    parts, base = guide.get_transform().parts, guide.get_base_dist()
    _perturb(parts[0].lazy, seed=dim)
    assert posterior.made_layers_of(parts[:-1]) is not None
    torch.manual_seed(1)
    # Wide draws: many fall outside the splines' [-5, 5], where they are the identity.
    eps = 3.0 * base.sample(batch)
    u, log_q, score = posterior.draw_with_score(parts, base, eps)
    u_ref, log_q_ref, score_ref = posterior.draw_with_batched_score(parts, base, eps)
    # The draw runs Zuko's own operations: the same values, bit for bit.
    assert torch.equal(u, u_ref) and torch.equal(log_q, log_q_ref)
    assert score.shape == batch + (dim,) and not score.requires_grad
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(score, score_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("hidden", [(16,), (8, 8, 8)])
def test_closed_form_score_any_depth(hidden):
    guide = _guide("SplineMAF", 3, hidden_features=hidden)
    parts, base = guide.get_transform().parts, guide.get_base_dist()
    _perturb(parts[0].lazy)
    eps = base.sample((5,))
    score = posterior.draw_with_score(parts, base, eps)[2]
    torch.testing.assert_close(score, posterior.draw_with_batched_score(parts, base, eps)[2])


def test_spline_bins_and_bound_are_read_from_the_flow():
    lazy = zuko.flows.NSF(3, transforms=2, bins=5, slope=1e-2, hidden_features=(8,)).transform
    layers = _made_layers_or_fail(lazy)
    assert [(kind, c["slope"], c["bound"]) for _, kind, c in layers] == [("rqs", 1e-2, 5.0)] * 2
    _perturb(lazy)
    eps = 2.0 * torch.randn(6, 3, dtype=torch.float64)
    lazy = lazy.double()
    y, ladj, score = stl.draw_and_score(_made_layers_or_fail(lazy), eps)
    # The score by autograd: J^{-T} (-eps - grad log|det J|).
    e = eps.clone().requires_grad_(True)
    y_ref, ladj_ref = lazy(None).call_and_ladj(e)
    jac = torch.autograd.functional.jacobian(lambda v: lazy(None)(v).sum(0), e).movedim(1, 0)
    (g,) = torch.autograd.grad(ladj_ref.sum(), e)
    ref = torch.linalg.solve(jac.mT, (-eps - g).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(y, y_ref) and torch.equal(ladj, ladj_ref)
    torch.testing.assert_close(score, ref)


def _made_layers_or_fail(lazy):
    layers = stl.made_layers(lazy)
    assert layers is not None
    return layers


@pytest.mark.parametrize(
    "lazy",
    [
        zuko.flows.MAF(3, hidden_features=(8,), activation=nn.ELU).transform,
        zuko.flows.MAF(3, hidden_features=(8, 8), residual=True).transform,
        zuko.flows.MAF(3, context=2, hidden_features=(8,)).transform,
        zuko.flows.RealNVP(3, hidden_features=(8,)).transform,
        zuko.flows.NAF(3, hidden_features=(8,)).transform,
        zuko.flows.MAF(1).transform,  # one feature: Zuko makes it element-wise
    ],
    ids=["elu", "residual", "context", "coupling", "naf", "one-feature"],
)
def test_other_layers_take_the_general_route(lazy):
    assert stl.made_layers(lazy) is None


def test_a_guide_outside_the_closed_form_trains_on_the_general_route():
    guide = _guide("MAF", 3, activation=nn.ELU)
    assert guide.estimator == "stl" and posterior.made_layers_of(guide.get_transform().parts[:-1]) is None
    parts, base = guide.get_transform().parts, guide.get_base_dist()
    u, log_q, score = posterior.draw_with_score(parts, base, base.sample((4,)))
    assert torch.isfinite(score).all() and score.shape == (4, 3)


@pytest.mark.parametrize(
    "flow, hyper",
    [("SplineMAF", {}), ("NSF", {}), ("SplineMAF", {"randperm": True})],
    ids=["splinemaf", "nsf", "randperm"],
)
def test_stl_gradients_are_those_of_the_general_route(monkeypatch, flow, hyper):
    """One SVI step's gradients with the closed-form score equal those with autograd's.

    The closed-form route also takes spline layers' gradients in closed form
    (``stl._Spline``); NSF's later splines read inputs that need them.
    """

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(), 0.5), obs=torch.tensor(1.0, dtype=torch.float64))

    def grads():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        torch.manual_seed(0)
        guide = pfg.AutoFlowGuide(model, flow=flow, **hyper)
        guide()
        _perturb(guide.get_transform().parts[0].lazy)
        loss = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True)
        loss.loss_and_grads(model, guide)
        return {n: p.grad.clone() for n, p in guide.named_parameters()}

    closed = grads()
    monkeypatch.setattr(posterior, "made_layers_of", lambda flow: None)
    general = grads()
    assert closed.keys() == general.keys()
    for name in closed:
        torch.testing.assert_close(closed[name], general[name], rtol=1e-9, atol=1e-12)


def test_a_guide_just_called_for_training_can_be_copied_and_pickled():
    import copy
    import pickle

    guide = _guide("SplineMAF", 3)  # called with grad enabled: views and caches hold a graph
    for other in (copy.deepcopy(guide), pickle.loads(pickle.dumps(guide))):
        pyro.set_rng_seed(3)
        a = guide.sample_posterior(5)["z"]
        pyro.set_rng_seed(3)
        assert torch.equal(a, other.sample_posterior(5)["z"])


@pytest.mark.parametrize(
    "make, kinds",
    [
        (lambda: zuko.flows.MAF(5, transforms=2, hidden_features=(16,)), ["lower", "upper"]),
        (lambda: zuko.flows.MAF(5, passes=2, hidden_features=(16,)), ["lower", "upper", "lower"]),
        (lambda: SplineMAF(5, transforms=3, randperm=True, hidden_features=(16,)), [None] * 4),
    ],
    ids=["alternated", "two-passes", "random-orders"],
)
def test_triangular_jacobians_are_found_from_the_masks(make, kinds):
    """A layer said to be lower / upper triangular has a Jacobian that is; the score agrees either way."""
    torch.manual_seed(0)
    lazy = make().transform.double()
    _perturb(lazy)
    layers = _made_layers_or_fail(lazy)
    assert [c["triangle"] for _, _, c in layers] == kinds
    x = torch.randn(5, dtype=torch.float64)
    for layer, _, const in layers:
        jac = torch.autograd.functional.jacobian(lambda v: layer(None)(v), x)
        lower, upper = (jac.triu(1) == 0).all(), (jac.tril(-1) == 0).all()
        assert const["triangle"] == ("lower" if lower else "upper" if upper else None)
    eps = 2.0 * torch.randn(6, 5, dtype=torch.float64)
    y, ladj, score = stl.draw_and_score(layers, eps)
    e = eps.clone().requires_grad_(True)
    y_ref, ladj_ref = lazy(None).call_and_ladj(e)
    jac = torch.autograd.functional.jacobian(lambda v: lazy(None)(v).sum(0), e).movedim(1, 0)
    (g,) = torch.autograd.grad(ladj_ref.sum(), e)
    ref = torch.linalg.solve(jac.mT, (-eps - g).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(score, ref)


def test_spline_node_gradients_are_zukos():
    """``_Spline``'s closed-form gradients in x and in the raw parameters equal autograd's through Zuko."""
    layer = zuko.flows.NSF(4, transforms=1, bins=6, hidden_features=(8,)).transform.transforms[0].double()
    (_, const), gen = stl._univariate_kind(layer), torch.Generator().manual_seed(0)
    const = {**const, "triangle": "lower"}
    # Draws inside and outside the spline's [-5, 5]; 2 x 3 batch dims.
    x = (4.0 * torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    phi = torch.randn(2, 3, 4, layer.total, generator=gen, dtype=torch.float64).requires_grad_(True)
    gy, gl = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    y, ladj = stl._Spline.apply(x, phi, layer, const, [])
    y_ref, ladj_ref = layer.univariate(*zuko.utils.unpack(phi, layer.shapes)).call_and_ladj(x)
    assert torch.equal(y, y_ref) and torch.equal(ladj, ladj_ref)
    for cot in ((gy, gl), (gy, None), (None, gl)):
        outs = [(o, c) for o, c in zip((y, ladj), cot) if c is not None]
        refs = [(o, c) for o, c in zip((y_ref, ladj_ref), cot) if c is not None]
        got = torch.autograd.grad([o for o, _ in outs], (x, phi), [c for _, c in outs], retain_graph=True)
        want = torch.autograd.grad([o for o, _ in refs], (x, phi), [c for _, c in refs], retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
