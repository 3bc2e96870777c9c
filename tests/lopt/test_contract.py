"""Learned optimizers under the optimizer contract, and the guards every step passes.

* ``lopt.as_transformation(num_steps, meta_params)`` is a ``GradientTransformation``
  (updates, ``needs_loss``) whose K-step unrolled loss is differentiable in the
  meta-parameters: checked against central finite differences in float64;
* ``lopt.call(meta_params, ...)`` evaluates perturbed meta-parameters without touching
  the module (ES/PES);
* non-finite losses/gradients are caught before any state is written, identically on
  the reference and the kernel backend; vector losses, zero-element tensors and steps
  past the horizon get clear behaviour.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from metaopt.bilevel import BilevelProblem
from metaopt.errors import NonFiniteError
from metaopt.lopt import SmallFCLOpt, cpu_kernels
from metaopt.lopt.mulo import MuSmallFC, MuVeLO
from metaopt.lopt.velo import VeLO
from metaopt.optim.base import GradientTransformation

HAS_KERNELS = cpu_kernels.kernels_available()
BACKENDS = ["reference", pytest.param("cpu_kernels", marks=pytest.mark.skipif(
    not HAS_KERNELS, reason="no C compiler"))]


def _task(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g, dtype=dtype)
    y = torch.randn(16, 3, generator=g, dtype=dtype)
    theta0 = {"w": 0.3 * torch.randn(5, 3, generator=g, dtype=dtype),
              "b": torch.zeros(3, dtype=dtype)}
    return x, y, theta0


def _unrolled_loss(opt: GradientTransformation, steps: int = 20, dtype=torch.float64):
    """Training loss after ``steps`` inner steps of ``opt`` (the inner loop's contract:
    ``update(grads, state, params[, loss=])`` → updates)."""
    x, y, theta = _task(dtype)
    theta = {k: v.requires_grad_(True) for k, v in theta.items()}
    state = opt.init(theta)
    for _ in range(steps):
        loss = ((x @ theta["w"] + theta["b"] - y) ** 2).mean()
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()),
                                                    create_graph=True)))
        kw = {"loss": loss} if opt.needs_loss else {}
        updates, state = opt.update(grads, state, theta, **kw)
        theta = {k: theta[k] + updates[k] for k in theta}
    return ((x @ theta["w"] + theta["b"] - y) ** 2).mean()


def _small_fc64() -> SmallFCLOpt:
    torch.manual_seed(3)
    lopt = SmallFCLOpt(step_mult=0.05).double()
    with torch.no_grad():
        for name, p in lopt.named_parameters():
            p.add_((0.02 if "decays" in name else 0.3) * torch.randn_like(p))
    return lopt


def test_meta_gradient_through_20_steps_matches_finite_differences():
    lopt = _small_fc64()
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in lopt.named_parameters()}
    loss = _unrolled_loss(lopt.as_transformation(20, phi))
    grads = torch.autograd.grad(loss, list(phi.values()))
    g = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in phi.items()}
    analytic = sum(float((gr * direction[k]).sum()) for gr, k in zip(grads, phi))
    eps = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1.0, -1.0):
            shifted = {k: v.detach() + sign * eps * direction[k] for k, v in phi.items()}
            with torch.enable_grad():
                values.append(float(_unrolled_loss(lopt.as_transformation(20, shifted))))
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # every meta-parameter tensor receives a gradient
    assert all(float(gr.abs().sum()) > 0 for gr in grads)


def test_transformation_is_an_inner_optimizer_of_a_bilevel_problem():
    lopt = VeLO(lstm_hidden_size=8, param_inits=4)
    phi = dict(lopt.named_parameters())
    problem = BilevelProblem(inner_loss=lambda t, p: t["w"].square().sum(),
                             outer_loss=lambda t, p: t["w"].sum(),
                             inner_optimizer=lambda p: lopt.as_transformation(10, p),
                             inner_steps=3)
    opt = problem.optimizer_for(phi)
    assert isinstance(opt, GradientTransformation) and opt.needs_loss
    theta = {"w": torch.randn(4, 3)}
    state = opt.init(theta)
    loss = theta["w"].square().sum()
    updates, state = opt.update({"w": 2 * theta["w"]}, state, theta, loss=loss)
    new_p, _ = lopt.update({"w": 2 * theta["w"]}, lopt.init(theta, 10), theta, loss=loss)
    torch.testing.assert_close(theta["w"] + updates["w"], new_p["w"])


@pytest.mark.parametrize("cls", [SmallFCLOpt, VeLO])
def test_perturbed_meta_parameters_leave_the_module_unchanged(cls):
    torch.manual_seed(0)
    lopt = cls(lstm_hidden_size=8, param_inits=4) if cls is VeLO else cls()
    before = {k: v.detach().clone() for k, v in lopt.named_parameters()}
    theta = {"w": torch.randn(6, 5), "b": torch.randn(5)}
    grads = {k: torch.sin(3 * v) for k, v in theta.items()}
    g = torch.Generator().manual_seed(2)
    noise = {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in before.items()}

    def evaluate(meta):
        state = lopt.call(meta, "init", theta, 10)
        with torch.no_grad():
            new_p, _ = lopt.call(meta, "update", grads, state, theta, loss=1.0)
        return new_p

    plus = evaluate({k: v + noise[k] for k, v in before.items()})
    minus = evaluate({k: v - noise[k] for k, v in before.items()})
    for k, v in lopt.named_parameters():
        assert torch.equal(v.detach(), before[k]), f"{k} was changed"
    assert any(not torch.equal(plus[k], minus[k]) for k in theta)
    # the perturbation means what loading it into a copy of the module means
    twin = copy.deepcopy(lopt)
    with torch.no_grad():
        for k, v in twin.named_parameters():
            v.add_(noise[k])
    state = twin.init(theta, 10)
    with torch.no_grad():
        expected, _ = twin.update(grads, state, theta, loss=1.0)
    for k in theta:
        torch.testing.assert_close(plus[k], expected[k], rtol=0, atol=0)


# ----------------------------------------------------------------------- guards


def _lopt(cls):
    torch.manual_seed(0)
    if issubclass(cls, VeLO):
        lopt = cls(lstm_hidden_size=8, param_inits=4)
        with torch.no_grad():
            lopt.rnn_to_controls.weight.normal_()
        return lopt
    return cls()


def _setup():
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    return params, {k: torch.sin(3 * v) for k, v in params.items()}


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree


def _assert_tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_equal(a[k], b[k])
    else:
        assert a == b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["loss_nan", "grad_nan", "grad_inf"])
@pytest.mark.parametrize("cls", [VeLO, SmallFCLOpt, MuVeLO])
def test_nonfinite_input_raises_or_skips_before_any_write(cls, bad, backend):
    if bad == "loss_nan" and not cls.needs_loss:
        pytest.skip("the loss is not read")
    lopt = _lopt(cls)
    params, grads = _setup()
    kern = cpu_kernels.select_backend(backend)
    state = lopt.init(params, 10)
    with torch.no_grad():  # one clean in-place step: state now lives in kernel layout
        state = lopt.update_(grads, state, params, loss=1.0, backend=kern, workspace={})
    loss = float("nan") if bad == "loss_nan" else 1.0
    bad_grads = dict(grads)
    if bad != "loss_nan":
        bad_grads["w"] = grads["w"].clone()
        bad_grads["w"][2, 3] = float("nan") if bad == "grad_nan" else float("inf")
    p_before, s_before = _clone(params), _clone(state)
    with torch.no_grad(), pytest.raises(NonFiniteError, match="step 1") as err:
        lopt.update_(bad_grads, state, params, loss=loss, backend=kern, workspace={})
    assert ("loss" in str(err.value)) if bad == "loss_nan" else ("'w'" in str(err.value))
    _assert_tree_equal(params, p_before)
    _assert_tree_equal(state, s_before)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="skipped"):
        new_state = lopt.update_(bad_grads, state, params, loss=loss, backend=kern,
                                 nonfinite="skip", workspace={})
        new_p, pure_state = lopt.update(bad_grads, state, params, loss=loss, backend=kern,
                                        nonfinite="skip")
    _assert_tree_equal(params, p_before)
    _assert_tree_equal(new_state, s_before)
    _assert_tree_equal(pure_state, s_before)
    _assert_tree_equal(new_p, p_before)
    # the skipped step left nothing behind: the next clean steps are finite
    with torch.no_grad():
        for _ in range(3):
            state = lopt.update_(grads, state, params, loss=1.0, backend=kern, workspace={})
    assert all(torch.isfinite(v).all() for v in params.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_nan_loss_does_not_poison_velo_in_the_shell(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = _lopt(VeLO).optimizer(model.parameters(), num_steps=30, backend=backend,
                                nonfinite="skip")
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for t in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if t == 2:
            with pytest.warns(RuntimeWarning, match="the loss is nan"):
                opt.step(loss=torch.tensor(float("nan")))
        else:
            opt.step(loss=loss)
    glob = opt.state_dict()["learned_optimizer"]["global_state"]
    assert int(glob["iteration"]) == 5
    assert all(torch.isfinite(t).all() for t in glob["loss_buffer"].values())
    for p in model.parameters():
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


@pytest.mark.parametrize("cls", [VeLO, SmallFCLOpt])
def test_a_vector_loss_is_a_one_line_error(cls):
    lopt = _lopt(cls)
    params, grads = _setup()
    with pytest.raises(ValueError, match=r"loss must be a scalar.*shape \(3,\)"):
        lopt.update(grads, lopt.init(params, 10), params, loss=torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [VeLO, SmallFCLOpt, MuSmallFC])
def test_zero_element_parameters_are_skipped(cls, backend):
    lopt = _lopt(cls)
    params, grads = _setup()
    params["empty"], grads["empty"] = torch.zeros(0, 4), torch.zeros(0, 4)
    params["e1"], grads["e1"] = torch.zeros(0), torch.zeros(0)
    state = lopt.init(params, 10)
    with torch.no_grad():
        new_p, new_state = lopt.update(grads, state, params, loss=1.0, backend=backend)
    assert new_p["empty"].shape == (0, 4) and not torch.equal(new_p["w"], params["w"])
    ref_p, _ = lopt.update({k: grads[k] for k in ("w", "b")},
                           lopt.init({k: params[k] for k in ("w", "b")}, 10),
                           {k: params[k] for k in ("w", "b")}, loss=1.0, backend=backend)
    for k in ("w", "b"):
        torch.testing.assert_close(new_p[k], ref_p[k])
    model = torch.nn.Linear(5, 3)
    model.register_parameter("empty", torch.nn.Parameter(torch.zeros(0, 5)))
    opt = lopt.optimizer(model.parameters(), num_steps=10, backend=backend)
    out = model(torch.randn(4, 5)).sum() + model.empty.sum()
    out.backward()
    opt.step(loss=out.detach())
    assert new_state["iteration"] == 1


def test_stepping_past_num_steps_warns_once():
    lopt = _lopt(SmallFCLOpt)
    params, grads = _setup()
    state = lopt.init(params, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            params, state = lopt.update(grads, state, params)
    past = [w for w in caught if "stepping past" in str(w.message)]
    assert len(past) == 1 and "num_steps=3" in str(past[0].message)


def test_backend_and_nonfinite_arguments_are_checked():
    lopt = _lopt(SmallFCLOpt)
    params, grads = _setup()
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        lopt.update(grads, lopt.init(params, 5), params, nonfinite="ignore")
    with pytest.raises(ValueError, match="backend must be one of"):
        lopt.optimizer([torch.nn.Parameter(torch.ones(2))], num_steps=5, backend="fastest")
