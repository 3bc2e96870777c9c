"""The MAML family on the shared bilevel estimators, and ``meta_loss`` as a loss.

These fail if switching MAML's estimator in one line stops working or changes what it
should not (checkpointing must not change the numbers, only the memory; truncation
must drop exactly the early steps), if iMAML's numbers move from the pre-redesign
implementation, if a meta-loss stops combining like a loss (scaled, plus a
regulariser, plus another meta-loss), or if a shape mistake passes silently.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from maml_reference import call, maml_grad, max_rel_diff, meta_grads, mlp, regression_batch
from torch import nn

from metaopt.algorithms import ANIL, MAML, iMAML
from metaopt.bilevel import FirstOrder, Implicit, LinearSolveWarning, Unrolled
from metaopt.bilevel.reference_problems import ridge_problem
from metaopt.bilevel.task_batch import saved_tensor_bytes


# --------------------------------------------------------------------------- estimators
def test_checkpointed_maml_equals_plain_maml_with_less_memory_at_50_steps():
    model, batch = mlp(), regression_batch(tasks=2)
    plain = MAML(model, inner_lr=0.01, inner_steps=50, strategy="loop")
    ckpt = MAML(model, inner_lr=0.01, inner_steps=50, strategy="loop",
                estimator=Unrolled(checkpoint_segment=5))
    (g_plain, l_plain), bytes_plain = saved_tensor_bytes(lambda: meta_grads(plain, batch))
    (g_ckpt, l_ckpt), bytes_ckpt = saved_tensor_bytes(lambda: meta_grads(ckpt, batch))
    assert l_ckpt == pytest.approx(l_plain, rel=1e-14)
    assert max_rel_diff(g_ckpt, g_plain) < 1e-12
    ref, _ = maml_grad(model, *batch, F.mse_loss, 0.01, 50)
    assert max_rel_diff(g_ckpt, {f"model.{k}": v for k, v in ref.items()}) < 1e-10
    # Total bytes saved for backward over the meta-step, the memory proxy; the peak
    # graph is what matters, and it is bounded by segments of 5 steps instead of 50.
    peak_plain = _peak(plain, batch)
    peak_ckpt = _peak(ckpt, batch)
    assert peak_ckpt < 0.35 * peak_plain, (peak_ckpt, peak_plain)
    assert bytes_plain > 0 and bytes_ckpt > 0


def _peak(algo, batch) -> int:
    import weakref

    live = peak = 0

    class Box:
        def __init__(self, t):
            self.t = t

    def drop(size):
        nonlocal live
        live -= size

    def pack(t):
        nonlocal live, peak
        size = t.numel() * t.element_size()
        live += size
        peak = max(peak, live)
        box = Box(t)
        weakref.finalize(box, drop, size)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
        meta_grads(algo, batch)
    return peak


def test_checkpointed_maml_runs_in_the_loop_and_refuses_vmap():
    model, batch = mlp(), regression_batch(tasks=3)
    auto = MAML(model, inner_lr=0.05, inner_steps=4, estimator=Unrolled(checkpoint_segment=2))
    for _ in range(2):
        meta_grads(auto, batch)
        assert auto.last_strategy == "loop"
    with pytest.raises(ValueError, match="one task at a time"):
        MAML(model, estimator=Unrolled(checkpoint_segment=2), strategy="vmap").meta_loss(
            *batch, F.mse_loss)


def _truncated_reference(model, batch, lr, steps, truncate, head):
    """ANIL-style truncated MAML by hand: the first K − T head steps without a graph."""
    phi = dict(model.named_parameters())
    sx, sy, qx, qy = batch
    total = 0.0
    for i in range(sx.shape[0]):
        theta = dict(phi)
        for step in range(steps):
            differentiated = step >= steps - truncate
            loss = F.mse_loss(call(model, theta, sx[i]), sy[i])
            gs = torch.autograd.grad(loss, [theta[k] for k in head],
                                     create_graph=differentiated)
            for k, g in zip(head, gs):
                theta[k] = theta[k] - lr * g
                if not differentiated:
                    theta[k] = theta[k].detach().requires_grad_()
        total = total + F.mse_loss(call(model, theta, qx[i]), qy[i])
    mean = total / sx.shape[0]
    grads = torch.autograd.grad(mean, list(phi.values()), allow_unused=True)
    return {k: torch.zeros_like(phi[k]) if g is None else g for k, g in zip(phi, grads)}


def test_truncated_maml_drops_exactly_the_early_steps():
    model, batch = mlp(), regression_batch(tasks=3)
    head = ["4.weight", "4.bias"]
    full, _ = meta_grads(ANIL(model, inner_lr=0.1, inner_steps=3, estimator=Unrolled()), batch)
    for T in (0, 1, 2, 3):
        got, _ = meta_grads(ANIL(model, inner_lr=0.1, inner_steps=3,
                             estimator=Unrolled(truncate=T)), batch)
        ref = _truncated_reference(model, batch, 0.1, 3, T, head)
        assert max_rel_diff(got, {f"model.{k}": v for k, v in ref.items()}) < 1e-10, T
        if T == 3:
            assert max_rel_diff(got, full) == 0.0
        else:
            assert max_rel_diff(got, full) > 1e-3, T  # the early steps' terms are gone
    # with every parameter adapted, θ_K depends on φ only through the dropped steps
    trunc, _ = meta_grads(MAML(model, inner_lr=0.1, inner_steps=3,
                           estimator=Unrolled(truncate=2)), batch)
    assert all(float(g.abs().max()) == 0.0 for g in trunc.values())


def test_estimator_one_liners():
    model, batch = mlp(), regression_batch(tasks=3)
    fo, _ = meta_grads(MAML(model, inner_lr=0.05, inner_steps=2, first_order=True), batch)
    fo2, _ = meta_grads(MAML(model, inner_lr=0.05, inner_steps=2, estimator=FirstOrder()), batch)
    assert max_rel_diff(fo, fo2) == 0.0
    imaml, _ = meta_grads(iMAML(model, inner_lr=0.05, inner_steps=3, lam=1.0, cg_steps=4), batch)
    implicit, _ = meta_grads(MAML(model, inner_lr=0.05, inner_steps=3,
                              estimator=Implicit(max_iter=4, warn=False, solver_options={
                                  "first_step_fallback": 1.0})), batch)
    assert max_rel_diff(implicit, imaml) == 0.0
    with pytest.raises(ValueError, match="conflicts"):
        MAML(model, first_order=True, estimator=Unrolled())
    with pytest.raises(TypeError, match="per-task objective"):
        MAML(model, estimator=object())


# Pre-redesign numbers (iMAML overriding _run, commit 8b05f92): loss and per-tensor
# (sum, sum of |·|) of the meta-gradient; mlp(), regression_batch(tasks=3), seed 0.
OLD_IMAML = {
    "cg": (4.251107826399454, {
        "model.0.weight": [2.1616684608929484, 19.33832399794323],
        "model.0.bias": [2.163606499534847, 8.751345571239376],
        "model.2.weight": [36.70162332765388, 105.09583190737038],
        "model.2.bias": [1.1840687096761005, 8.476460916399715],
        "model.4.weight": [-4.133927783891735, 31.504354589267077],
        "model.4.bias": [1.0926508233402557, 1.0926508233402557]}),
    "lanczos": (4.251107826399454, {
        "model.0.weight": [-0.19142993456338198, 1.2688466954692161],
        "model.0.bias": [0.5636223488564369, 0.5730320422587637],
        "model.2.weight": [1.3964631186994532, 5.958511850293926],
        "model.2.bias": [-0.02056811244118915, 0.2983748434028465],
        "model.4.weight": [0.7774881225067894, 2.4624381131541893],
        "model.4.bias": [0.08291974841317697, 0.08291974841317697]}),
    "normal_cg": (4.251107826399454, {
        "model.0.weight": [-0.16167267454658518, 0.4547771517564564],
        "model.0.bias": [0.35530174693903827, 0.4075685174870124],
        "model.2.weight": [0.5614999619787882, 5.1054307801122345],
        "model.2.bias": [0.01942025572883635, 0.5272081431197725],
        "model.4.weight": [1.1744276025321279, 2.0678320864761046],
        "model.4.bias": [0.19990862305295468, 0.19990862305295468]}),
}


@pytest.mark.parametrize("solver", list(OLD_IMAML))
def test_imaml_through_implicit_reproduces_the_old_numbers(solver):
    model, batch = mlp(), regression_batch(tasks=3)
    algo = iMAML(model, inner_lr=0.05, inner_steps=3, lam=2.0, cg_steps=4, solver=solver)
    grads, loss = meta_grads(algo, batch)
    old_loss, old = OLD_IMAML[solver]
    assert loss == old_loss
    for k, (total, absolute) in old.items():
        assert float(grads[k].sum()) == pytest.approx(total, rel=1e-12, abs=1e-13), k
        assert float(grads[k].abs().sum()) == pytest.approx(absolute, rel=1e-12), k
    assert len(algo.last_diagnostics) == 3
    assert algo.last_diagnostics[0]["linear_solver"] == solver


def test_anil_by_name_prefix_on_a_non_sequential_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh())
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.body(x))

    model, batch = Net().double(), regression_batch(tasks=2)
    anil, _ = meta_grads(ANIL(model, inner_lr=0.1, inner_steps=2, head="head"), batch)
    ref, _ = meta_grads(MAML(model, inner_lr=0.1, inner_steps=2,
                         inner_params=["head.weight", "head.bias"]), batch)
    assert max_rel_diff(anil, ref) == 0.0
    with pytest.raises(ValueError, match="no parameters under 'neck.'"):
        ANIL(model, head="neck")


# --------------------------------------------------------------------------- meta_loss as a loss
def test_meta_loss_plus_a_regulariser_and_another_meta_loss_give_the_full_graph_gradient():
    model = mlp()
    a, b = regression_batch(tasks=3, seed=1), regression_batch(tasks=2, seed=2)
    maml = MAML(model, inner_lr=0.05, inner_steps=2)
    maml.zero_grad()
    la = maml.meta_loss(*a, F.mse_loss)
    lb = maml.meta_loss(*b, F.mse_loss)
    reg = sum(p.square().sum() for p in model.parameters())
    total = 0.5 * la + 2.0 * lb + 0.1 * reg + la * lb
    total.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    # the reference builds every graph: autograd through all tasks of both batches
    ga, va = maml_grad(model, *a, F.mse_loss, 0.05, 2)
    gb, vb = maml_grad(model, *b, F.mse_loss, 0.05, 2)
    ref = {k: (0.5 + vb) * ga[k] + (2.0 + va) * gb[k] + 0.2 * p.detach()
           for k, p in model.named_parameters()}
    got = {k.removeprefix("model."): v for k, v in got.items()}
    assert max_rel_diff(got, ref) < 1e-12
    assert float(total.detach()) == pytest.approx(
        0.5 * va + 2.0 * vb + 0.1 * float(reg.detach()) + va * vb, rel=1e-12)


def test_meta_loss_supports_one_backward_and_no_higher_order():
    model, batch = mlp(), regression_batch()
    maml = MAML(model, inner_lr=0.05)
    loss = maml.meta_loss(*batch, F.mse_loss)
    loss.backward()
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()
    loss = maml.meta_loss(*batch, F.mse_loss)
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


# --------------------------------------------------------------------------- shape mistakes
def test_regression_inputs_without_a_task_axis_raise_a_named_error():
    model = mlp()
    maml = MAML(model, inner_lr=0.05)
    x = torch.randn(10, 1, dtype=torch.float64)  # one task's (examples, 1), no task axis
    with pytest.raises(ValueError, match=r"support_x has shape \(10, 1\)"):
        maml.meta_loss(x, x, x, x, F.mse_loss)
    with pytest.raises(ValueError, match=r"x has shape \(10,\)"):
        maml.adapt(x[:, 0], x[:, 0], F.mse_loss)


@pytest.mark.parametrize("target_shape", [(2, 6), (2, 6, 1)])
def test_a_model_with_three_outputs_against_one_target_raises(target_shape):
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    maml = MAML(model, inner_lr=0.05)
    sx = torch.randn(2, 6, 1, dtype=torch.float64)
    y = torch.randn(*target_shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's broadcasting warning: our error
        with pytest.raises(ValueError, match="support_y has per-example shape"):
            maml.meta_loss(sx, y, sx, y, F.mse_loss)
        with pytest.raises(ValueError, match="y has per-example shape"):
            maml.adapt(sx[0], y[0], F.mse_loss)


def test_class_labels_of_the_wrong_rank_raise():
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    sx = torch.randn(2, 6, 1, dtype=torch.float64)
    labels = torch.zeros(2, 6, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="class labels need"):
        MAML(model).meta_loss(sx, labels, sx, labels, F.cross_entropy)
    with pytest.raises(ValueError, match="class labels need"):
        MAML(model).meta_loss(sx, labels, sx, labels, nn.CrossEntropyLoss())


def test_a_custom_loss_may_pair_other_shapes():
    """Only torch's own elementwise/class losses get the strict shape rule: a Gaussian
    NLL on (mean, log-variance) outputs against one target column is fine."""
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    sx = torch.randn(2, 6, 1, dtype=torch.float64)
    y = torch.randn(2, 6, 1, dtype=torch.float64)

    def gaussian_nll(out, target):
        mean, log_var = out[:, :1], out[:, 1:]
        return (0.5 * (log_var + (target - mean) ** 2 / log_var.exp())).mean()

    MAML(model, inner_lr=0.01).meta_loss(sx, y, sx, y, gaussian_nll).backward()


# --------------------------------------------------------------------------- Implicit's tol
def test_implicit_default_tol_scales_with_the_dtype():
    from metaopt.bilevel.implicit import default_tol

    assert default_tol(torch.float64) == 1e-10
    assert 1e-4 < default_tol(torch.float32) < 1e-3
    ref = ridge_problem(d=8, inner_steps=400, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearSolveWarning)
        hg = Implicit(solver="cg")(ref.problem, ref.phi, ref.theta0)
    assert hg.diagnostics["linear_converged"]
    with pytest.warns(LinearSolveWarning):  # what the old default did on every call
        Implicit(solver="cg", tol=1e-10)(ref.problem, ref.phi, ref.theta0)
    ref64 = ridge_problem(d=8, inner_steps=400, dtype=torch.float64)
    hg64 = Implicit(solver="cg")(ref64.problem, ref64.phi, ref64.theta0)
    assert hg64.diagnostics["linear_residual"] <= 1e-10
