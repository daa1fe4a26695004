"""The flat parameter behind AutoFlowGuide: layout, views, gradients, copies."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyro_flowguide.guides.packing import Packing


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_views_reproduce_the_module_and_gradients_reach_every_entry():
    net = _net()
    x = torch.randn(5, 3)
    expected = net(x)
    packing = Packing([("loc", torch.arange(3.0))], net)
    assert list(net.parameters()) == []
    flat = nn.Parameter(packing.initial.clone())
    views = packing.bind(flat, net)
    assert torch.equal(views["loc"], torch.arange(3.0))
    out = net(x)
    assert torch.equal(out, expected)
    (out.sum() + views["loc"].sum()).backward()
    assert flat.grad.shape == (3 + 3 * 4 + 4 + 4 * 2 + 2,)
    assert bool((flat.grad != 0).all())


def test_in_place_updates_of_the_flat_tensor_reach_the_module():
    net = _net()
    packing = Packing([], net)
    flat = nn.Parameter(packing.initial.clone())
    packing.bind(flat, net)
    with torch.no_grad():
        flat.zero_()  # what an optimiser step does, in place
    assert bool((net(torch.randn(2, 3)) == 0).all())


def test_shared_and_frozen_parameters():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = a.weight  # tied weights get one range
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    tree = nn.ModuleList([a, b, frozen])
    packing = Packing([], tree)
    assert len(packing) == 4 + 2 + 2 + 2  # the tied weight once, three biases
    assert [p is frozen.weight for p in tree.parameters()] == [True]
    flat = nn.Parameter(packing.initial.clone())
    packing.bind(flat, tree)
    assert a.weight.data_ptr() == b.weight.data_ptr()


def test_empty_parameters_keep_their_own_piece():
    tree = nn.Module()
    tree.empty = nn.Parameter(torch.zeros(0))
    tree.full = nn.Parameter(torch.ones(3))
    packing = Packing([("x", torch.zeros(0)), ("y", torch.full((2,), 2.0))], tree)
    views = packing.bind(nn.Parameter(packing.initial.clone()), tree)
    assert views["x"].shape == (0,) and torch.equal(views["y"], torch.full((2,), 2.0))
    assert tree.empty.shape == (0,) and torch.equal(tree.full, torch.ones(3))


def test_an_unbound_copy_binds_to_the_same_vector_without_gradient():
    net = _net()
    packing = Packing([], net)
    flat = nn.Parameter(packing.initial.clone())
    packing.bind(flat, net)
    packing.unbind(net)
    shadow = copy.deepcopy(net)  # bound views hold a graph; deepcopy refuses those
    packing.bind(flat, net)
    packing.bind(flat.detach(), shadow)
    x = torch.randn(4, 3)
    assert torch.equal(shadow(x), net(x))
    assert not shadow(x).requires_grad
    with torch.no_grad():
        flat.mul_(2.0)
    assert torch.equal(shadow(x), net(x))  # both follow the one storage


def test_bind_for_grad_gives_the_same_values_and_gradients_in_one_pass():
    a, b = nn.Linear(3, 3), nn.Linear(3, 2)
    b.weight = nn.Parameter(a.weight[:2].detach().clone())
    tree = nn.ModuleList([a, b])
    tree.tied = a  # one range for a module reached twice
    tree.empty = nn.Parameter(torch.zeros(0))
    x = torch.randn(5, 3)
    grads = []
    for bind in ("bind", "bind_for_grad"):
        torch.manual_seed(0)
        net = copy.deepcopy(tree)
        packing = Packing([("loc", torch.arange(1.0, 4.0)), ("none", torch.zeros(0))], net)
        flat = nn.Parameter(packing.initial.clone())
        views = getattr(packing, bind)(flat, net)
        assert views["none"].shape == (0,) and net.empty.shape == (0,)
        out = net[1](torch.tanh(net[0](x)))
        loss = (out**2).sum() + (views["loc"] ** 3).sum() + 2 * net.tied.bias.sum()
        loss.backward()
        grads.append(flat.grad)
        if bind == "bind_for_grad":
            # Copies: writing to one leaves the parameter as it was.
            with torch.no_grad():
                views["loc"].zero_()
            assert torch.equal(flat[:3].detach(), torch.arange(1.0, 4.0))
            # Without autograd it is bind: views that see in-place updates.
            with torch.no_grad():
                views = packing.bind_for_grad(flat, net)
                flat.zero_()
            assert bool((views["loc"] == 0).all())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert bool((grads[1][:3] != 0).all())
