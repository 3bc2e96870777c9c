"""Parameter dicts over unmodified modules; tree algebra."""

import pytest
import torch
from torch import nn

from metaopt.params import (
    StructureError,
    buffers_of,
    check_finite,
    functional_call,
    parameters_of,
    tree_dot,
    tree_flatten,
    tree_norm,
    tree_unflatten,
)


def test_functional_call_matches_module_and_leaves_it_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 3)
    params = {k: v * 2 for k, v in parameters_of(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = functional_call(model, params, x, buffers={k: v.clone() for k, v in
                                                     buffers_of(model).items()})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # neither weights nor running stats changed
    model2 = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model2.load_state_dict(before)
    with torch.no_grad():
        for p in model2.parameters():
            p.mul_(2)
    torch.testing.assert_close(out, model2(x))


def test_functional_call_names_missing_and_unexpected_keys():
    model = nn.Linear(2, 2)
    with pytest.raises(StructureError, match=r"missing parameters \['bias'\], unexpected \['b'\]"):
        functional_call(model, {"weight": torch.zeros(2, 2), "b": torch.zeros(2)}, torch.ones(1, 2))


def test_tree_ops():
    a = {"x": torch.tensor([3.0]), "y": torch.tensor([[4.0]])}
    assert float(tree_norm(a)) == 5.0
    assert float(tree_dot(a, a)) == 25.0
    flat = tree_flatten(a)
    back = tree_unflatten(flat, a)
    assert back["y"].shape == (1, 1) and torch.equal(back["y"], a["y"])
    with pytest.raises(StructureError, match="vector has 3 elements"):
        tree_unflatten(torch.zeros(3), a)


def test_check_finite_names_tensor():
    with pytest.raises(FloatingPointError, match="NaN in 'b' after step 3"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])},
                     "after step 3")
