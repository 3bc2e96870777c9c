"""The torch.optim shell over learned optimizers (exercised with small_fc_lopt)."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from metaopt.lopt import LearnedOptimizer, LearnedOptimizerShell, MissingLossError, SmallFCLOpt


def make_lopt(seed: int = 0) -> SmallFCLOpt:
    torch.manual_seed(seed)
    lopt = SmallFCLOpt()
    with torch.no_grad():  # non-degenerate decays and biases
        for p in lopt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lopt


def make_model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def data(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sched=None) -> list[float]:
    x, y = data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return losses


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def test_optimizer_method_and_basic_training():
    model = make_model()
    opt = make_lopt().optimizer(model.parameters(), num_steps=100)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, LearnedOptimizerShell)
    before = flat(model)
    train(model, opt, 3)
    assert not torch.equal(before, flat(model))
    state = opt.state[next(model.parameters())]
    assert set(state) == {"m", "rms", "v_row", "v_col", "v_diag"}
    assert int(opt.state_dict()["learned_optimizer"]["global_state"]["iteration"]) == 3


def test_shell_equals_functional_update():
    lopt, model = make_lopt(), make_model()
    params = {str(i): p.detach().clone() for i, p in enumerate(model.parameters())}
    opt = lopt.optimizer(model.parameters(), num_steps=50)
    x, y = data()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    grads = {str(i): p.grad.clone() for i, p in enumerate(model.parameters())}
    opt.step(loss=loss)
    with torch.no_grad():
        expected, _ = lopt.update(grads, lopt.init(params, 50), params, backend=opt.backend)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p.detach(), expected[str(i)])


def test_closure_step():
    model, lopt = make_model(), make_lopt()
    x, y = data()
    opt = lopt.optimizer(model.parameters(), num_steps=10)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_state_dict_round_trip_continues_identically():
    lopt = make_lopt()
    model_a = make_model()
    opt_a = lopt.optimizer(model_a.parameters(), num_steps=40)
    train(model_a, opt_a, 4)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # no pickle of arbitrary objects needed

    model_b = make_model(seed=99)
    model_b.load_state_dict(saved["model"])
    opt_b = lopt.optimizer(model_b.parameters(), num_steps=1)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.num_steps == 40
    train(model_a, opt_a, 3)
    train(model_b, opt_b, 3)
    assert torch.equal(flat(model_a), flat(model_b))


def test_load_state_dict_of_other_architecture_is_refused():
    model = make_model()
    opt = make_lopt().optimizer(model.parameters(), num_steps=5)
    train(model, opt, 1)
    sd = opt.state_dict()
    sd["learned_optimizer"]["architecture"] = "velo"
    with pytest.raises(ValueError, match="velo"):
        make_lopt().optimizer(make_model().parameters(), num_steps=5).load_state_dict(sd)


def test_param_groups_lr_is_a_multiplier_and_lr_zero_freezes():
    lopt = make_lopt()
    ref, scaled = make_model(), make_model()
    opt_ref = lopt.optimizer(ref.parameters(), num_steps=20)
    opt = lopt.optimizer([{"params": scaled[0].parameters(), "lr": 0.5},
                          {"params": scaled[2].parameters(), "lr": 0.0}], num_steps=20)
    start = [p.detach().clone() for p in scaled.parameters()]
    train(ref, opt_ref, 1)
    train(scaled, opt, 1)
    w_ref, w, w0 = ref[0].weight.detach(), scaled[0].weight.detach(), start[0]
    # float32 rounding of ~1e-4 steps
    torch.testing.assert_close(w - w0, 0.5 * (w_ref - w0), rtol=0, atol=1e-7)
    assert torch.equal(scaled[2].weight.detach(), start[2])


def test_lr_scheduler_scales_the_learned_step():
    lopt = make_lopt()
    model = make_model()
    opt = lopt.optimizer(model.parameters(), num_steps=20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    train(model, opt, 1, sched)
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = flat(model)
    train(model, opt, 2, sched)
    assert torch.equal(frozen, flat(model))


def test_weight_decay_is_decoupled():
    lopt = make_lopt()
    plain, decayed = make_model(), make_model()
    before = [p.detach().clone() for p in decayed.parameters()]
    train(plain, lopt.optimizer(plain.parameters(), num_steps=10), 1)
    train(decayed, lopt.optimizer(decayed.parameters(), num_steps=10, weight_decay=0.1), 1)
    for p0, a, b in zip(before, plain.parameters(), decayed.parameters()):
        torch.testing.assert_close(b.detach(), a.detach() - 0.1 * p0, rtol=1e-6, atol=1e-7)


def test_mixed_dtypes_keep_state_in_parameter_dtype():
    model = make_model()
    model[0].double()
    model[2].to(torch.bfloat16)
    lopt = make_lopt()
    opt = lopt.optimizer(model.parameters(), num_steps=10)
    x, y = data()
    for _ in range(2):
        opt.zero_grad()
        h = torch.tanh(model[0](x.double())).to(torch.bfloat16)
        loss = ((model[2](h).float() - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
    for p in model.parameters():
        assert p.dtype in (torch.float64, torch.bfloat16)
        for value in opt.state[p].values():
            assert value.dtype == p.dtype
        assert torch.isfinite(p.float()).all()
    sd = opt.state_dict()
    opt2 = lopt.optimizer(model.parameters(), num_steps=10)
    opt2.load_state_dict(sd)
    assert opt2.state[model[2].weight]["m"].dtype == torch.bfloat16


def test_params_without_grad_are_left_alone():
    model = make_model()
    model[2].bias.requires_grad_(False)
    opt = make_lopt().optimizer(model.parameters(), num_steps=10)
    bias = model[2].bias.detach().clone()
    train(model, opt, 2)
    assert torch.equal(bias, model[2].bias.detach())
    # Gaining a gradient later starts from its (zero) initial state.
    model[2].bias.requires_grad_(True)
    train(model, opt, 1)
    assert not torch.equal(bias, model[2].bias.detach())


def test_deepcopy_of_optimizer_works():
    model = make_model()
    opt = make_lopt().optimizer(model.parameters(), num_steps=10)
    train(model, opt, 1)
    clone = copy.deepcopy(opt)
    assert clone.num_steps == 10 and clone.lopt.architecture == "small_fc_lopt"


class _NeedsLoss(LearnedOptimizer):
    """Minimal loss-using architecture: sign descent scaled by the loss."""

    architecture = "test_needs_loss"
    needs_loss = True

    def config(self) -> dict[str, Any]:
        return {}

    def init(self, params, num_steps):
        return {"seen": torch.zeros(())}

    def update(self, grads, state, params, loss=None):
        assert loss is not None
        new = {k: p - 1e-3 * loss * torch.sign(grads[k]) for k, p in params.items()}
        return new, {"seen": state["seen"] + loss}


def test_missing_loss_is_a_clear_error():
    model = make_model()
    opt = _NeedsLoss().optimizer(model.parameters(), num_steps=10)
    x, y = data()
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(MissingLossError, match="needs the training loss"):
        opt.step()
    opt.step(loss=0.5)
    assert float(opt.state_dict()["learned_optimizer"]["global_state"]["seen"]) == 0.5
