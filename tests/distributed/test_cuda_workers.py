"""Workers computing on CUDA give the CPU numbers (skipped without a GPU).

``gpus_per_worker > 0`` makes a Ray worker's :attr:`worker_device` ``"cuda"``: a
meta-batch slice moves its φ and tasks there and its result comes back on CPU. Here
the same path runs in-process (a local executor told its workers compute on CUDA);
``pytest tests/distributed/test_cuda_workers.py`` where a GPU is lent.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from metaopt.algorithms.maml import MAML
from metaopt.distributed import LocalExecutor
from metaopt.distributed.sharding import learner_meta_gradient
from metaopt.runner.config import parse_run_config
from metaopt.runner.loop import build_experiment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(T: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(T, 12, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = (torch.rand(T, 1, 1, generator=g, dtype=torch.float64) + 0.5) * torch.sin(
        x + torch.rand(T, 1, 1, generator=g, dtype=torch.float64) * math.pi)
    return x[:, :6], y[:, :6], x[:, 6:], y[:, 6:]


def test_slices_on_cuda_equal_cpu_and_come_back_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    make = functools.partial(MAML, model, inner_lr=0.05, inner_steps=2, strategy="loop")
    phi = make().outer_parameters()
    data = _batch()
    cpu = learner_meta_gradient(LocalExecutor(2), make, phi, *data, nn.functional.mse_loss)
    gpu = learner_meta_gradient(LocalExecutor(2), make, phi, *data, nn.functional.mse_loss,
                                device="cuda")
    for k in cpu.grads:
        assert gpu.grads[k].device.type == "cpu"
        torch.testing.assert_close(gpu.grads[k], cpu.grads[k], rtol=1e-10, atol=1e-12)


def test_sinusoid_experiment_with_cuda_workers_matches_cpu_workers():
    settings = {"hidden": [8, 8], "k_shot": 3, "q_query": 4, "meta_batch": 4,
                "eval_tasks": 2, "eval_query": 5, "eval_shots": [2], "eval_steps": [0, 1]}
    cfg = parse_run_config({"experiment": "sinusoid", "steps": 2, "dtype": "float64",
                            "settings": settings, "executor": {"num_workers": 2}})
    on_cpu, on_gpu = build_experiment(cfg), build_experiment(cfg)
    on_gpu.executor.worker_device = "cuda"  # what a Ray executor with GPUs reports
    for step in (1, 2):
        a, b = on_cpu.meta_step(step)["loss"], on_gpu.meta_step(step)["loss"]
        assert abs(a - b) <= 1e-10 * abs(a)
    for k, p in on_cpu.trainer.meta_parameters.items():
        q = on_gpu.trainer.meta_parameters[k]
        assert q.device.type == "cpu"
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-10, atol=1e-12)
