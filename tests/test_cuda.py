"""CUDA runs of the public paths agree with the CPU (skipped without a GPU).

CI has no GPU; these run where one is lent (``pytest tests/test_cuda.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metaopt.algorithms import MAML
from metaopt.lopt.small_fc import SmallFCLOpt
from metaopt.lopt.velo import VeLO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(model: nn.Module, lopt, device: str, steps: int = 20) -> dict[str, torch.Tensor]:
    model = model.to(device)
    opt = lopt.to(device).optimizer(list(model.parameters()), num_steps=steps)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g).to(device), torch.randn(64, 4, generator=g).to(device)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", [SmallFCLOpt, VeLO])
def test_learned_optimizer_cuda_matches_cpu(arch) -> None:
    torch.manual_seed(3)
    lopt = arch()
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = _model()
    cpu = _train(copy.deepcopy(model), copy.deepcopy(lopt), "cpu")
    gpu = _train(copy.deepcopy(model), copy.deepcopy(lopt), "cuda")
    start = model.state_dict()
    for k in cpu:
        moved = (cpu[k] - start[k]).abs().max()
        assert moved > 0
        assert ((gpu[k] - cpu[k]).abs() / (1 + cpu[k].abs())).max() < 1e-4, k


def test_maml_meta_gradient_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    sx, sy = torch.randn(4, 10, 16, generator=g), torch.randn(4, 10, 4, generator=g)
    qx, qy = torch.randn(4, 10, 16, generator=g), torch.randn(4, 10, 4, generator=g)
    grads = {}
    for device in ("cpu", "cuda"):
        model = _model().to(device)
        maml = MAML(model, inner_lr=0.1, inner_steps=2, first_order=False)
        loss = maml.meta_loss(sx.to(device), sy.to(device), qx.to(device), qy.to(device),
                              nn.functional.mse_loss)
        loss.backward()
        grads[device] = [p.grad.detach().cpu() for p in model.parameters()]
    for a, b in zip(grads["cpu"], grads["cuda"], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
