"""Small models, meta-batches and hand-written references (autograd, higher) for the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.params import Params


def call(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Model output with ``params``; BatchNorm in training mode uses batch statistics."""
    buffers = {f"{name}.{b}": None for name, mod in model.named_modules()
               if isinstance(mod, nn.BatchNorm2d) and mod.training
               for b in ("running_mean", "running_var", "num_batches_tracked")}
    return torch.func.functional_call(model, {**params, **buffers}, (x,))


def maml_grad(model, sx, sy, qx, qy, loss_fn, lr, steps, *, first_order=False,
              inner=None, lrs=None) -> tuple[Params, float]:
    """Mean-over-tasks MAML meta-gradient by plain autograd (optionally per-entry lrs)."""
    phi = dict(model.named_parameters())
    inner = list(phi) if inner is None else inner
    total = 0.0
    for i in range(sx.shape[0]):
        theta = dict(phi)
        for _ in range(steps):
            loss = loss_fn(call(model, theta, sx[i]), sy[i])
            gs = torch.autograd.grad(loss, [theta[k] for k in inner],
                                     create_graph=not first_order)
            for k, g in zip(inner, gs):
                rate = lr if lrs is None else lrs[k]
                theta[k] = theta[k] - rate * g
        total = total + loss_fn(call(model, theta, qx[i]), qy[i])
    mean = total / sx.shape[0]
    leaves = list(phi.values()) + ([] if lrs is None else list(lrs.values()))
    grads = torch.autograd.grad(mean, leaves, allow_unused=True)
    names = list(phi) + ([] if lrs is None else [f"lr:{k}" for k in lrs])
    out = {k: (torch.zeros(()) if g is None else g) for k, g in zip(names, grads)}
    return out, float(mean.detach())


def higher_grad(model, sx, sy, qx, qy, loss_fn, lr, steps) -> Params:
    """The same meta-gradient computed by the ``higher`` library."""
    import higher

    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = sx.shape[0]
    for i in range(n):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                  track_higher_grads=True) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(sx[i]), sy[i]))
            (loss_fn(fmodel(qx[i]), qy[i]) / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    return grads


def max_rel_diff(a: Params, b: Params, keys=None) -> float:
    """Largest |a − b| over all entries, relative to the largest |b| (global scale)."""
    keys = list(b) if keys is None else keys
    scale = max(float(b[k].abs().max()) for k in keys)
    return max(float((a[k] - b[k]).abs().max()) for k in keys) / scale


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, 1)).double()


def conv_bn(classes: int = 3) -> nn.Module:
    """A two-block version of the MAML conv net (conv, BatchNorm, ReLU, max-pool)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, classes)).double()


def regression_batch(tasks: int = 3, shots: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, 2 * shots, 1, generator=g, dtype=torch.float64) * 10 - 5
    amp = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 4 + 0.5
    ys = amp * torch.sin(xs)
    return xs[:, :shots], ys[:, :shots], xs[:, shots:], ys[:, shots:]


def classification_batch(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 3,
                         seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, ways * queries, 1, 8, 8, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return sx, sy, qx, qy


def grads_after(algo, batch, loss_fn=F.mse_loss, model=None):
    """One ``meta_loss(...).backward()``: the meta-gradient by name and the loss."""
    model = algo.model if model is None else model
    algo.zero_grad()
    loss = algo.meta_loss(*batch, loss_fn)
    loss.backward()
    out = {k: p.grad.clone() for k, p in model.named_parameters()}
    algo.zero_grad()
    return out, float(loss.detach())


def meta_grads(algo, batch, loss_fn=F.mse_loss):
    """:func:`grads_after` keyed by the learner's own parameter names (``model.*`` and
    any extra meta-learned tensors, e.g. Meta-SGD's learning rates)."""
    return grads_after(algo, batch, loss_fn, model=algo)
