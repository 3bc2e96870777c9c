"""μLO: the learned step is scaled per tensor exactly as μP prescribes."""

from __future__ import annotations

import pytest
import torch

from metaopt.lopt.base import ARCHITECTURES
from metaopt.lopt.mulo import MuSmallFC, MuVeLO, resolve_mup_scales
from metaopt.lopt.mup import MuMLP, mup_update_scales
from metaopt.lopt.small_fc import SmallFCLOpt
from metaopt.lopt.velo import VeLO
from metaopt.params import parameters_of


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(kind):
    torch.manual_seed(0)
    if kind == "velo":
        base = VeLO(lstm_hidden_size=16, param_inits=8)
        with torch.no_grad():
            base.rnn_to_controls.weight.normal_(0, 0.5)
            base.step_size.bias.fill_(1.0)
        mu = MuVeLO(lstm_hidden_size=16, param_inits=8)
    else:
        base, mu = SmallFCLOpt(), MuSmallFC()
    mu.load_state_dict(base.state_dict())
    return base, mu


def _steps(lopt, params, n=3, **init_kw):
    state = lopt.init(params, 20, **init_kw)
    out = []
    gen = torch.Generator().manual_seed(3)
    for i in range(n):
        grads = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in params.items()}
        new, state = lopt.update(grads, state, params, loss=torch.tensor(1.0 / (i + 1)))
        out.append({k: new[k] - params[k] for k in params})
        params = new
    return out, state


@pytest.mark.parametrize("kind", ["velo", "small_fc"])
@pytest.mark.parametrize("width", [64, 256])
def test_hidden_updates_scale_as_one_over_fan_in_mult(kind, width):
    """Same model, same gradients: μLO's first step equals the base optimizer's step
    times ``1/width_mult`` on hidden weights and times 1 on input, bias and readout."""
    model = MuMLP(8, width, 3, depth=2, base_width=64, zero_readout=False)
    params = {k: v.detach().clone() for k, v in parameters_of(model).items()}
    scales = mup_update_scales(model.mup_info())
    assert scales["body.2.weight"] == 64 / width and scales["body.0.weight"] == 1.0
    base, mu = _pair(kind)
    with torch.no_grad():
        ref, _ = _steps(base, params, n=1)
        got, state = _steps(mu, params, n=1, mup_scales=scales)
    for k in params:
        assert float(state["mup_scale"][k]) == scales[k]
        expected = ref[0][k] * scales[k]
        atol = 4 * torch.finfo(torch.float32).eps * float(params[k].abs().max())
        torch.testing.assert_close(got[0][k], expected, rtol=1e-4, atol=atol)
        assert float(ref[0][k].abs().max()) > 0  # a real step was taken


def test_per_coordinate_hidden_update_shrinks_with_width():
    """Across widths, μLO's hidden-weight update per coordinate relative to the base
    optimizer's shrinks exactly like 1/width_mult (the documented rule)."""
    ratios = {}
    for width in (64, 128, 512):
        model = MuMLP(8, width, 3, depth=2, base_width=64, zero_readout=False)
        params = {k: v.detach() for k, v in parameters_of(model).items()}
        base, mu = _pair("velo")
        with torch.no_grad():
            ref, _ = _steps(base, params, n=1)
            got, _ = _steps(mu, params, n=1, mup_scales=model.mup_scales())  # through init
        k = "body.2.weight"
        ratios[width] = float(got[0][k].abs().mean() / ref[0][k].abs().mean())
    assert ratios[64] == pytest.approx(1.0, rel=1e-4)
    assert ratios[128] == pytest.approx(0.5, rel=1e-4)
    assert ratios[512] == pytest.approx(0.125, rel=1e-4)


def test_scales_come_only_through_init():
    model = MuMLP(4, 128, 2, depth=1, base_width=32)
    params = dict(model.named_parameters())
    scales = resolve_mup_scales(params)
    assert scales["readout.weight"] == 1.0 and scales["body.0.weight"] == 1.0
    assert resolve_mup_scales(params, {"body.0.weight": 0.5})["body.0.weight"] == 0.5
    assert resolve_mup_scales({"x": torch.zeros(3)}) == {"x": 1.0}
    with pytest.raises(ValueError):
        resolve_mup_scales({"x": torch.zeros(3)}, {"x": 0.0})


def test_through_torch_optimizer_shell_takes_scales_through_init():
    torch.manual_seed(0)
    model = MuMLP(6, 128, 2, depth=2, base_width=32)
    mu = MuSmallFC()
    assert not [k for p in model.parameters() for k in vars(p) if "mup" in k]
    opt = mu.optimizer(model.parameters(), num_steps=10,
                       mup_scales=list(model.mup_scales().values()))
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    hidden = model.body[2].weight
    assert float(opt.state[hidden]["mup_scale"]) == 0.25
    assert float(opt.state[model.body[0].weight]["mup_scale"]) == 1.0
    assert torch.all(torch.isfinite(hidden))


def test_registered():
    assert ARCHITECTURES["mulo_velo"] is MuVeLO
    assert ARCHITECTURES["mulo_small_fc"] is MuSmallFC
    assert MuVeLO.release_config({"MuHyperV2.param_inits": 8})["param_inits"] == 8
