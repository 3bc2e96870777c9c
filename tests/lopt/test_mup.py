"""μP parametrisation: shape bookkeeping and a coordinate check across widths."""

from __future__ import annotations

import pytest
import torch

from metaopt.lopt.mup import (
    MuMLP,
    MuReadout,
    infer_mup_info,
    mup_update_scales,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matmuls: one thread avoids spin-waiting on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_infer_kinds_and_multipliers():
    base = {"inp.weight": (64, 10), "inp.bias": (64,), "hid.weight": (64, 64),
            "out.weight": (5, 64), "out.bias": (5,)}
    wide = {"inp.weight": (256, 10), "inp.bias": (256,), "hid.weight": (256, 256),
            "out.weight": (5, 256), "out.bias": (5,)}
    info = infer_mup_info(wide, base)
    assert {k: v.kind for k, v in info.items()} == {
        "inp.weight": "input", "inp.bias": "vector", "hid.weight": "hidden",
        "out.weight": "output", "out.bias": "finite"}
    assert info["hid.weight"].width_mult == 4.0 and info["out.weight"].width_mult == 4.0
    assert info["inp.weight"].fan_in_mult == 1.0 and info["inp.weight"].fan_out_mult == 4.0
    scales = mup_update_scales(info)
    assert scales == {"inp.weight": 1.0, "inp.bias": 1.0, "hid.weight": 0.25,
                      "out.weight": 1.0, "out.bias": 1.0}
    # With a delta model, infinite axes are known even at the base width itself.
    delta = {k: tuple(2 * d if d == 64 else d for d in s) for k, s in base.items()}
    same = infer_mup_info(base, base, delta)
    assert same["hid.weight"].kind == "hidden" and same["hid.weight"].update_scale == 1.0
    with pytest.raises(KeyError):
        infer_mup_info({"a": (2,)}, {"b": (2,)})


def test_mumlp_structure_and_attached_info():
    model = MuMLP(8, 256, 3, depth=2, base_width=64)
    info = model.mup_info()
    assert info["body.0.weight"].kind == "input"
    assert info["body.2.weight"].kind == "hidden" and info["body.2.weight"].width_mult == 4
    assert info["readout.weight"].kind == "output"
    assert torch.all(model.readout.weight == 0)  # zero readout init
    assert model(torch.randn(4, 8)).abs().max() == 0
    assert model.mup_scales()["body.2.weight"] == 0.25
    assert model.mup_scales()["body.0.weight"] == 1.0


def test_readout_divides_by_width_mult():
    torch.manual_seed(0)
    r = MuReadout(16, 2, width_mult=4.0, zero_init=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(r(x), torch.nn.functional.linear(x, r.weight, r.bias) / 4.0,
                               rtol=1e-6, atol=1e-7)


def _coord_check(width: int, mup: bool, steps: int = 3, lr: float = 0.02) -> tuple[float, float]:
    """Mean |Δ last hidden activation| and mean |Δ output| after ``steps`` Adam steps."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen)
    y = torch.randn(32, 4, generator=gen)
    torch.manual_seed(1)
    if mup:
        model = MuMLP(8, width, 4, depth=2, base_width=64, generator=gen)
        scales = mup_update_scales(model.mup_info())
    else:  # standard parametrisation: nn.Linear readout, one learning rate
        model = MuMLP(8, width, 4, depth=2, base_width=width, zero_readout=False, generator=gen)
        scales = {n: 1.0 for n, _ in model.named_parameters()}
    groups = [{"params": [p], "lr": lr * scales[n]} for n, p in model.named_parameters()]
    opt = torch.optim.Adam(groups)
    with torch.no_grad():
        h0, f0 = model.body(x), model(x)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float((model.body(x) - h0).abs().mean()), float((model(x) - f0).abs().mean())


def test_coordinate_check_mup_is_width_stable_sp_is_not():
    widths = (64, 256, 1024)
    mup = [_coord_check(w, True) for w in widths]
    sp = [_coord_check(w, False) for w in widths]
    for i in range(2):  # hidden activations, outputs
        vals = [m[i] for m in mup]
        assert max(vals) / min(vals) < 2.0, (i, vals)
    # Without μP the hidden-feature update grows with width (~3x over 16x here).
    sp_hidden = [s[0] for s in sp]
    assert sp_hidden[-1] / sp_hidden[0] > 2.5, sp_hidden
