"""The MAML family against hand-written autograd, higher, closed forms and finite differences."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from maml_reference import (
    call,
    classification_batch,
    conv_bn,
    grads_after,
    higher_grad,
    maml_grad,
    max_rel_diff,
    mlp,
    regression_batch,
)
from torch import nn

from metaopt.algorithms import ANIL, FOMAML, MAML, MetaSGD, Reptile, iMAML
from metaopt.bilevel import Unrolled

CASES = [("mlp", mlp, regression_batch, F.mse_loss, 0.05),
         ("conv_bn", conv_bn, classification_batch, F.cross_entropy, 0.4)]


EXECUTION = {"loop": {"strategy": "loop"}, "vmap": {"strategy": "vmap"},
             "vmap-chunk2": {"strategy": "vmap", "chunk_size": 2}, "default": {},
             "checkpointed": {"estimator": Unrolled(checkpoint_segment=2)}}


@pytest.mark.parametrize("execution", list(EXECUTION))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name,make,data,loss_fn,lr", CASES)
def test_maml_second_order_matches_autograd_and_higher(name, make, data, loss_fn, lr, steps,
                                                       execution):
    """float64: every execution setting within 1e-10 of autograd and of higher."""
    if name == "conv_bn" and execution.startswith("vmap"):
        pytest.skip("second order through BatchNorm is refused under vmap (tested below)")
    model, batch = make(), data()
    maml = MAML(model, inner_lr=lr, inner_steps=steps, **EXECUTION[execution])
    ref, ref_value = maml_grad(model, *batch, loss_fn, lr, steps)
    peer = higher_grad(model, *batch, loss_fn, lr, steps)
    for _ in range(2):  # the default decides on its first meta-batch and uses it later
        ours, value = grads_after(maml, batch, loss_fn)
        assert value == pytest.approx(ref_value, rel=1e-12)
        assert max_rel_diff(ours, ref) < 1e-10
        assert max_rel_diff(ours, peer) < 1e-10
    # second order matters here: the first-order gradient is far away
    fo, _ = maml_grad(model, *batch, loss_fn, lr, steps, first_order=True)
    assert max_rel_diff(fo, ref) > 1e-3


@pytest.mark.parametrize("name,make,data,loss_fn,lr", CASES)
def test_fomaml_matches_first_order_reference(name, make, data, loss_fn, lr):
    model, batch = make(), data()
    ours, _ = grads_after(FOMAML(model, inner_lr=lr, inner_steps=2, strategy="loop"),
                          batch, loss_fn)
    ref, _ = maml_grad(model, *batch, loss_fn, lr, 2, first_order=True)
    assert max_rel_diff(ours, ref) < 1e-10
    same, _ = grads_after(MAML(model, inner_lr=lr, inner_steps=2, first_order=True,
                               strategy="loop"), batch, loss_fn)
    assert max_rel_diff(same, ref) < 1e-10


def test_vmap_equals_loop_on_mlp():
    model, batch = mlp(), regression_batch(tasks=5)
    for algo_cls, kw in [(MAML, {}), (FOMAML, {}), (MetaSGD, {}), (Reptile, {}),
                         (ANIL, {})]:
        loop = algo_cls(model, inner_lr=0.05, inner_steps=2, strategy="loop", **kw)
        vm = algo_cls(model, inner_lr=0.05, inner_steps=2, strategy="vmap", **kw)
        g_loop, v_loop = grads_after(loop, batch, F.mse_loss)
        g_vmap, v_vmap = grads_after(vm, batch, F.mse_loss)
        assert vm.last_strategy == "vmap" and loop.last_strategy == "loop"
        assert v_vmap == pytest.approx(v_loop, rel=1e-12), algo_cls.__name__
        assert max_rel_diff(g_vmap, g_loop) < 1e-10, algo_cls.__name__
    chunked = MAML(model, inner_lr=0.05, inner_steps=2, strategy="vmap", chunk_size=2)
    g_chunk, _ = grads_after(chunked, batch, F.mse_loss)
    g_loop, _ = grads_after(MAML(model, inner_lr=0.05, inner_steps=2, strategy="loop"),
                            batch, F.mse_loss)
    assert max_rel_diff(g_chunk, g_loop) < 1e-10


def test_auto_strategy_never_vmaps_batchnorm_second_order():
    # torch.func gives wrong second-order gradients through BatchNorm under vmap
    # (pytorch/functorch#534): auto must use the loop, explicit vmap must refuse.
    model, batch = conv_bn(), classification_batch()
    auto = MAML(model, inner_lr=0.4, inner_steps=1)
    grads_after(auto, batch, F.cross_entropy)
    assert auto.last_strategy == "loop"
    with pytest.raises(ValueError, match="BatchNorm2d"):
        MAML(model, inner_lr=0.4, strategy="vmap").meta_loss(*batch, F.cross_entropy)
    # first order does not differentiate through the batch-norm backward: vmap is fine
    fo_loop, _ = grads_after(FOMAML(model, inner_lr=0.4, strategy="loop"), batch,
                             F.cross_entropy)
    fo_vmap, _ = grads_after(FOMAML(model, inner_lr=0.4, strategy="vmap"), batch,
                             F.cross_entropy)
    assert max_rel_diff(fo_vmap, fo_loop) < 1e-10


def test_auto_keeps_the_loop_for_modules_of_the_users_own_classes():
    class Counting(nn.Module):
        """Writes into a buffer in place on every call: impossible under vmap."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1).double()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            self.calls.add_(x.sum().detach())
            return self.lin(x)

    model, batch = Counting(), regression_batch()
    algo = MAML(model, inner_lr=0.05)  # the default budget would fit every task
    ref, _ = maml_grad(model, *batch, F.mse_loss, 0.05, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the second meta-batch would use the budget's choice
            g, _ = grads_after(algo, batch, F.mse_loss)
            assert algo.last_strategy == "loop"
            assert max_rel_diff(g, ref) < 1e-10
    assert algo.task_footprints == {}  # decided by the rule, nothing measured
    with pytest.raises(RuntimeError):
        grads_after(MAML(model, inner_lr=0.05, strategy="vmap"), batch, F.mse_loss)


def test_anil_equals_maml_restricted_to_head():
    model, batch = conv_bn(), classification_batch()
    head = ["9.weight", "9.bias"]
    anil, _ = grads_after(ANIL(model, inner_lr=0.4, inner_steps=2), batch, F.cross_entropy)
    restricted, _ = grads_after(MAML(model, inner_lr=0.4, inner_steps=2, inner_params=head),
                                batch, F.cross_entropy)
    ref, _ = maml_grad(model, *batch, F.cross_entropy, 0.4, 2, inner=head)
    assert max_rel_diff(anil, ref) < 1e-10
    assert max_rel_diff(restricted, ref) < 1e-10
    assert float(anil["0.weight"].abs().max()) > 0  # the body is meta-learned too


def test_meta_sgd_learning_rates_get_the_finite_difference_gradient():
    model, batch = mlp(), regression_batch()
    algo = MetaSGD(model, inner_lr=0.05, inner_steps=2, strategy="loop")
    with torch.no_grad():  # distinct rates per entry, so a mix-up would show
        for lr in algo.inner_lrs.values():
            lr.uniform_(0.02, 0.08)
    algo.zero_grad()
    algo.meta_loss(*batch, F.mse_loss).backward()
    name = "2.weight"
    lr = algo.lr_of(name)
    analytic = lr.grad.clone()
    # against autograd with the same rates
    lrs = {k: algo.lr_of(k) for k, _ in model.named_parameters()}
    ref, _ = maml_grad(model, *batch, F.mse_loss, None, 2, lrs=lrs)
    assert float((analytic - ref[f"lr:{name}"]).abs().max()) < 1e-10 * max(
        1.0, float(analytic.abs().max()))
    # against central finite differences on a few entries
    eps = 1e-6
    for idx in [(0, 0), (3, 7), (11, 5)]:
        with torch.no_grad():
            old = lr[idx].item()
            lr[idx] = old + eps
            plus = float(algo.meta_loss(*batch, F.mse_loss))
            lr[idx] = old - eps
            minus = float(algo.meta_loss(*batch, F.mse_loss))
            lr[idx] = old
        fd = (plus - minus) / (2 * eps)
        assert analytic[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    assert name.replace(".", "__") in dict(algo.named_parameters()).__repr__() or any(
        p is lr for p in algo.parameters())


def test_reptile_direction_by_hand():
    model, batch = mlp(), regression_batch()
    lr, steps = 0.05, 3
    algo = Reptile(model, inner_lr=lr, inner_steps=steps, strategy="loop")
    got, value = grads_after(algo, batch, F.mse_loss)
    sx, sy, qx, qy = batch
    phi = {k: p.detach() for k, p in model.named_parameters()}
    finals, queries, dists = [], [], []
    for i in range(sx.shape[0]):
        theta = {k: v.clone().requires_grad_() for k, v in phi.items()}
        for _ in range(steps):
            gs = torch.autograd.grad(F.mse_loss(call(model, theta, sx[i]), sy[i]),
                                     list(theta.values()))
            theta = {k: (v - lr * g).detach().requires_grad_()
                     for (k, v), g in zip(theta.items(), gs)}
        finals.append(theta)
        queries.append(float(F.mse_loss(call(model, theta, qx[i]), qy[i]).detach()))
        dists.append(sum(0.5 * float((phi[k] - theta[k]).square().sum()) for k in phi))
    expected = {k: phi[k] - torch.stack([t[k].detach() for t in finals]).mean(0) for k in phi}
    assert max_rel_diff(got, expected) < 1e-12
    assert value == pytest.approx(sum(dists) / len(dists), rel=1e-12)
    assert float(algo.last_query_loss) == pytest.approx(sum(queries) / len(queries), rel=1e-12)


def imaml_dense_systems(model, algo, batch):
    """Per task: the support-loss Hessian H and query gradient g at iMAML's θ*, dense."""
    sx, sy, qx, qy = batch
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def unflat(vec):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            n = s.numel()
            out[k] = vec[i:i + n].reshape(s)
            i += n
        return out

    systems = []
    for i in range(sx.shape[0]):
        theta = algo.adapt(sx[i], sy[i], F.mse_loss)  # the same inner solver
        flat = torch.cat([theta[k].reshape(-1) for k in names])
        hess = torch.autograd.functional.hessian(
            lambda v, i=i: F.mse_loss(call(model, unflat(v), sx[i]), sy[i]), flat)
        q = flat.clone().requires_grad_()
        gq = torch.autograd.grad(F.mse_loss(call(model, unflat(q), qx[i]), qy[i]), q)[0]
        systems.append((hess, gq))
    return systems, unflat, theta


def dense_imaml_grad(systems, unflat, lam, floor=None):
    """Mean over tasks of λ (H + λI)⁻¹ g, or of λ |H + λI|₊⁻¹ g with eigenvalues
    replaced by max(|e|, floor) -- the saddle-free solve -- when ``floor`` is given."""
    total = 0
    for hess, gq in systems:
        a = hess + lam * torch.eye(gq.numel(), dtype=gq.dtype)
        if floor is None:
            total = total + lam * torch.linalg.solve(a, gq)
        else:
            evals, evecs = torch.linalg.eigh(a)
            total = total + lam * evecs @ ((evecs.T @ gq) / evals.abs().clamp_min(floor))
    return unflat(total / len(systems))


def test_imaml_matches_exact_ift_with_materialised_hessian():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    batch = regression_batch(tasks=2, shots=8)
    lam, lr, steps = 2.0, 0.05, 40
    kw = dict(inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=100, cg_tol=1e-14)
    # H has negative eigenvalues (down to -0.7) but H + λI ⪰ 1.3 I: the default CG and
    # the Lanczos solve with a floor below 1.3 are both the plain IFT formula.
    algo = iMAML(model, **kw)
    got, _ = grads_after(algo, batch, F.mse_loss)
    systems, unflat, theta = imaml_dense_systems(model, algo, batch)
    assert all(float(torch.linalg.eigvalsh(h)[0]) < 0 for h, _ in systems)
    expected = dense_imaml_grad(systems, unflat, lam)
    assert max_rel_diff(got, expected) < 1e-8
    assert all(d["linear_negative_curvature_at"] == 0 for d in algo.last_diagnostics)
    low_floor = iMAML(model, **kw, solver="lanczos", min_eig=0.5)
    got, _ = grads_after(low_floor, batch, F.mse_loss)
    assert max_rel_diff(got, expected) < 1e-8
    assert all(d["linear_modified"] == 0 for d in low_floor.last_diagnostics)
    # Lanczos' default floor λ treats that negative curvature of H as zero curvature
    floor_lam, _ = grads_after(iMAML(model, **kw, solver="lanczos"), batch, F.mse_loss)
    assert max_rel_diff(floor_lam, dense_imaml_grad(systems, unflat, lam, lam)) < 1e-8
    # the proximal solution is near phi but not at it
    phi = {k: p.detach() for k, p in model.named_parameters()}
    assert 0 < float(sum((theta[k] - phi[k]).abs().sum() for k in phi))


def test_imaml_is_exact_ift_for_a_convex_task_loss():
    # Linear regression: H ⪰ 0, so CG and Lanczos (floor λ) are both exact.
    torch.manual_seed(3)
    model = nn.Linear(1, 1).double()
    batch = regression_batch(tasks=3, shots=8)
    kw = dict(inner_lr=0.02, inner_steps=10, lam=0.5, cg_steps=50, cg_tol=1e-14)
    algo = iMAML(model, **kw)
    got, _ = grads_after(algo, batch, F.mse_loss)
    systems, unflat, _ = imaml_dense_systems(model, algo, batch)
    expected = dense_imaml_grad(systems, unflat, 0.5)
    assert max_rel_diff(got, expected) < 1e-8
    lanczos = iMAML(model, **kw, solver="lanczos")
    got, _ = grads_after(lanczos, batch, F.mse_loss)
    assert max_rel_diff(got, expected) < 1e-8
    assert all(d["linear_modified"] == 0 for d in lanczos.last_diagnostics)


def test_imaml_negative_curvature_on_first_direction_gives_first_order_gradient():
    # A concave support loss (negative MSE) and small λ make H + λI negative definite, so
    # CG meets negative curvature on its first direction. It used to return u = 0 -- a
    # zero meta-gradient for the task; truncated Newton-CG falls back to u = g/λ, i.e.
    # the first-order meta-gradient ∇L_query(θ*).
    torch.manual_seed(4)
    model = nn.Linear(3, 1).double()
    g = torch.Generator().manual_seed(4)
    sx, qx = (torch.randn(2, 6, 3, dtype=torch.float64, generator=g) for _ in range(2))
    sy, qy = (torch.randn(2, 6, 1, dtype=torch.float64, generator=g) for _ in range(2))

    def loss_fn(pred, y):
        return -F.mse_loss(pred, y)

    algo = iMAML(model, inner_lr=0.01, inner_steps=3, lam=0.01, cg_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # truncation is by design: no warning
        got, _ = grads_after(algo, (sx, sy, qx, qy), loss_fn)
    first_order = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(2):
        theta = {k: v.detach().requires_grad_() for k, v in
                 algo.adapt(sx[i], sy[i], loss_fn).items()}
        grads = torch.autograd.grad(loss_fn(call(model, theta, qx[i]), qy[i]),
                                    list(theta.values()))
        for k, gk in zip(theta, grads):
            first_order[k] += gk / 2
    assert max_rel_diff(got, first_order) < 1e-10
    assert all(d["linear_negative_curvature_at"] == 1 for d in algo.last_diagnostics)


def test_imaml_solver_options_on_an_indefinite_system():
    # λ = 0.3 is below the support loss's negative curvature: H + λI is indefinite (as
    # on the glyph conv net). The default truncated CG stops at the negative curvature;
    # solver="lanczos" is the saddle-free solve, solver="normal_cg" the exact one.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    batch = regression_batch(tasks=2, shots=8)
    kw = dict(inner_lr=0.05, inner_steps=5, lam=0.3, cg_steps=100, cg_tol=1e-12)
    algo = iMAML(model, **kw, solver="lanczos")
    got, _ = grads_after(algo, batch, F.mse_loss)
    systems, unflat, _ = imaml_dense_systems(model, algo, batch)
    for hess, _ in systems:  # indefinite
        assert float(torch.linalg.eigvalsh(hess)[0]) < -0.3
    saddle_free = dense_imaml_grad(systems, unflat, 0.3, 0.3)
    exact = dense_imaml_grad(systems, unflat, 0.3)
    assert max_rel_diff(got, saddle_free) < 1e-8
    assert algo.min_eig == pytest.approx(0.3)
    assert all(d["linear_modified"] > 0 and d["linear_converged"] for d in algo.last_diagnostics)
    # contraction: no longer than the mean query gradient's per-task norms
    g_norm = sum(float(gq.norm()) for _, gq in systems) / len(systems)
    assert float(torch.cat([v.reshape(-1) for v in got.values()]).norm()) <= g_norm
    low_floor, _ = grads_after(iMAML(model, **kw, solver="lanczos", min_eig=0.03),
                               batch, F.mse_loss)
    assert max_rel_diff(low_floor, dense_imaml_grad(systems, unflat, 0.3, 0.03)) < 1e-8

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # truncation is by design: no warning
        truncated = iMAML(model, **kw)
        got_cg, _ = grads_after(truncated, batch, F.mse_loss)
    assert truncated.solver == "cg"
    assert all(d["linear_negative_curvature_at"] > 1 for d in truncated.last_diagnostics)
    assert max_rel_diff(got_cg, saddle_free) > 0.1
    assert max_rel_diff(got_cg, exact) > 0.1
    exact_solve = iMAML(model, **kw | dict(cg_steps=2000, cg_tol=1e-9), solver="normal_cg")
    got_exact, _ = grads_after(exact_solve, batch, F.mse_loss)
    assert max_rel_diff(got_exact, exact) < 1e-6
    with pytest.raises(ValueError, match="solver must be one of"):
        iMAML(model, solver="neumann")


def test_adapt_returns_inner_sgd_result_and_leaves_model_alone():
    model = conv_bn()
    sx, sy, _, _ = classification_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maml = MAML(model, inner_lr=0.4, inner_steps=2)
    adapted = maml.adapt(sx[0], sy[0], F.cross_entropy)
    phi = dict(model.named_parameters())
    theta = dict(phi)
    for _ in range(2):
        gs = torch.autograd.grad(F.cross_entropy(call(model, theta, sx[0]), sy[0]),
                                 list(theta.values()))
        theta = {k: v - 0.4 * g for (k, v), g in zip(theta.items(), gs)}
    assert max_rel_diff(adapted, {k: v.detach() for k, v in theta.items()}) < 1e-12
    assert all(not v.requires_grad for v in adapted.values())
    three = maml.adapt(sx[0], sy[0], F.cross_entropy, steps=3)
    assert max_rel_diff(three, adapted) > 1e-6
    logits = maml.predict(adapted, sx[0])
    assert logits.shape == (sx.shape[1], 3)
    for k, v in model.state_dict().items():  # running stats and weights untouched
        assert torch.equal(v, before[k]), k


def test_meta_loss_leaves_batchnorm_running_stats_alone():
    model = conv_bn()
    before = {k: v.clone() for k, v in model.named_buffers()}
    MAML(model, inner_lr=0.4, inner_steps=2).meta_loss(*classification_batch(),
                                                      F.cross_entropy).backward()
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


def test_eval_mode_uses_running_stats():
    model = conv_bn()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    model.eval()
    batch = classification_batch()
    ours, _ = grads_after(MAML(model, inner_lr=0.4, strategy="loop"), batch, F.cross_entropy)
    phi = dict(model.named_parameters())
    total = 0
    for i in range(2):
        fwd = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
        gs = torch.autograd.grad(F.cross_entropy(fwd(phi, batch[0][i]), batch[1][i]),
                                 list(phi.values()), create_graph=True)
        theta = {k: v - 0.4 * g for (k, v), g in zip(phi.items(), gs)}
        total = total + F.cross_entropy(fwd(theta, batch[2][i]), batch[3][i]) / 2
    ref = dict(zip(phi, torch.autograd.grad(total, list(phi.values()))))
    assert max_rel_diff(ours, ref) < 1e-10


def test_no_grad_meta_loss_evaluates_only():
    model, batch = mlp(), regression_batch()
    maml = MAML(model, inner_lr=0.05, inner_steps=2)
    with torch.no_grad():
        value = maml.meta_loss(*batch, F.mse_loss)
    assert not value.requires_grad
    _, ref = maml_grad(model, *batch, F.mse_loss, 0.05, 2)
    assert float(value) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("change,match", [
    (lambda b: (b[0][:, :3], *b[1:]), "support_x has 3 examples per task"),
    (lambda b: (b[0], b[1], b[2][:1], b[3]), "query_x has 1 tasks"),
    (lambda b: (b[0][0], b[1][0], b[2][0], b[3][0]), "support_y has shape .*task axis"),
    (lambda b: (b[0], b[1], b[2][..., :4, :], b[3]), "query_x examples have shape"),
    (lambda b: (b[0], b[1], b[2], b[3] + 3), "query_y contains label 5 but the model "
                                             "outputs 3 classes"),
    (lambda b: (b[0], b[1] - 1, b[2], b[3]), "support_y contains label -1"),
    (lambda b: (b[0][:, :0], b[1][:, :0], b[2], b[3]), "support_x has no examples"),
])
def test_bad_input_names_the_tensor(change, match):
    maml = MAML(conv_bn(), inner_lr=0.4)
    with pytest.raises((ValueError, TypeError), match=match):
        maml.meta_loss(*change(classification_batch()), F.cross_entropy)


def test_bad_adapt_input_and_constructor_arguments():
    model = conv_bn()
    sx, sy, _, _ = classification_batch()
    maml = MAML(model, inner_lr=0.4)
    with pytest.raises(ValueError, match="y has shape"):
        maml.adapt(sx[0], sy[0][:2], F.cross_entropy)
    with pytest.raises(ValueError, match="y contains label 7"):
        maml.adapt(sx[0], sy[0] + 5, F.cross_entropy)
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(model, inner_steps=-1)
    with pytest.raises(ValueError, match="not parameters"):
        MAML(model, inner_params=["nope.weight"])
    with pytest.raises(ValueError, match="strategy"):
        MAML(model, strategy="threads")
    with pytest.raises(TypeError, match="nn.Sequential"):
        ANIL(nn.Module())


def test_meta_loss_backward_scales_and_runs_once():
    model, batch = mlp(), regression_batch()
    maml = MAML(model, inner_lr=0.05, strategy="loop")
    ref, _ = maml_grad(model, *batch, F.mse_loss, 0.05, 1)
    loss = maml.meta_loss(*batch, F.mse_loss)
    (3.0 * loss).backward(retain_graph=True)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert max_rel_diff(got, {k: 3.0 * v for k, v in ref.items()}) < 1e-12
    with pytest.raises(RuntimeError, match="already"):
        loss.backward()


@pytest.mark.parametrize("make_algo", [
    lambda m: MAML(m, inner_lr=0.4, inner_steps=1),
    lambda m: FOMAML(m, inner_lr=0.4, inner_steps=1, strategy="loop"),
    lambda m: ANIL(m, inner_lr=0.4, inner_steps=1, strategy="loop"),
    lambda m: MetaSGD(m, inner_lr=0.4, inner_steps=1, strategy="loop"),
    lambda m: Reptile(m, inner_lr=0.4, inner_steps=1, strategy="loop"),
    lambda m: iMAML(m, inner_lr=0.1, inner_steps=2, lam=10.0, cg_steps=3),
], ids=["maml", "fomaml", "anil", "metasgd", "reptile", "imaml"])
def test_every_algorithm_trains_a_batchnorm_convnet(make_algo):
    model = conv_bn()
    algo = make_algo(model)
    batch = classification_batch(queries=2)
    opt = torch.optim.SGD(algo.parameters(), lr=0.01)
    opt.zero_grad()
    loss = algo.meta_loss(*batch, F.cross_entropy)
    loss.backward()
    for name, p in algo.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any("running" in k for k in changed)
    adapted = algo.adapt(batch[0][0], batch[1][0], F.cross_entropy)
    assert set(adapted) == {k for k, _ in model.named_parameters()}
    assert algo.predict(adapted, batch[2][0]).shape == (batch[2].shape[1], 3)
    assert algo.last_task_losses.shape == (2,)
    assert algo.last_strategy == "loop"  # BatchNorm in training mode
