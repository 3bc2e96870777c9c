"""The local executor, sharding and the PES pool in one process (no Ray needed)."""

from __future__ import annotations

import functools
import math
import sys

import pytest
import torch
from torch import nn

from metaopt.algorithms.maml import MAML
from metaopt.bilevel.pes import PES
from metaopt.bilevel.reference_problems import InfluenceBalancing
from metaopt.bilevel.truncation import ConstantLength
from metaopt.distributed import LocalExecutor, StateLost, WorkerError, make_executor
from metaopt.distributed.executor import _import_ray, _probe
from metaopt.distributed.pes_pool import PESPool
from metaopt.distributed.sharding import learner_meta_gradient, shard_slices
from metaopt.errors import ConfigError, MissingExtraError


def test_shard_slices_cover_the_batch_contiguously():
    assert shard_slices(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert shard_slices(2, 4) == [slice(0, 1), slice(1, 2)]


def test_sharded_maml_equals_whole_batch_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    make = functools.partial(MAML, model, inner_lr=0.05, inner_steps=2, strategy="loop")
    learner = make()
    T = 5
    x = torch.rand(T, 12, 1, dtype=torch.float64) * 10 - 5
    y = (torch.rand(T, 1, 1, dtype=torch.float64) + 0.5) * torch.sin(
        x + torch.rand(T, 1, 1, dtype=torch.float64) * math.pi)
    data = (x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])
    learner.meta_loss(*data, nn.functional.mse_loss).backward()
    ref = {k: p.grad.clone() for k, p in learner.outer_parameters().items()}
    got = learner_meta_gradient(LocalExecutor(3), make, learner.outer_parameters(), *data,
                                nn.functional.mse_loss)
    for k in ref:
        torch.testing.assert_close(got.grads[k], ref[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("segment_objective", ["mean", "log_mean"])
def test_pes_pool_equals_pes_and_checkpoints_the_slots(segment_objective):
    system = InfluenceBalancing()
    est = PES(num_tasks=6, truncation=4, sigma=0.1, schedule=ConstantLength(7), seed=1,
              segment_objective=segment_objective)
    phi = {"theta": torch.tensor([0.5], dtype=torch.float64)}
    state, ref = None, []
    for _ in range(3):
        hg = est(system, phi, None, state)
        state, ref = hg.state, [*ref, hg.grad["theta"]]
    pool = PESPool(LocalExecutor(2), est, system, phi, sync_every=2)
    got = [pool.step(phi).grad["theta"] for _ in range(3)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(pool.checkpoint_state().unroll.inner["s"],
                               state.unroll.inner["s"], rtol=0, atol=0)
    # Per step: phi (8 bytes), the seed and the index (8 bytes each) to each of 2 workers.
    assert [r["sent"] for r in pool.bytes_per_step] == [48, 48, 48]


def test_stateful_call_on_an_empty_worker_is_refused():
    with pytest.raises(StateLost, match="no state"):
        LocalExecutor(1).call_each(lambda store, x: x, [0])


def test_make_executor_names_bad_fields():
    assert make_executor(None).num_workers == 1
    assert make_executor({"kind": "local", "num_workers": 2}).num_workers == 2
    with pytest.raises(ConfigError, match="executor.kind"):
        make_executor({"kind": "mpi"})
    with pytest.raises(ConfigError, match="unknown keys"):
        make_executor({"kind": "ray", "workers": 2})
    with pytest.raises(ConfigError, match="num_workers"):
        make_executor({"kind": "local", "num_workers": 0})


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingExtraError, match=r"metaopt\[ray\]"):
        _import_ray()


def test_pes_pool_resumes_from_its_checkpoint_state():
    # A driver checkpoint (TruncatedState, tensors only) restarts a fresh pool that
    # continues exactly as the uninterrupted one.
    system = InfluenceBalancing()
    est = PES(num_tasks=5, truncation=3, sigma=0.1, schedule=ConstantLength(4), seed=2)
    phi = {"theta": torch.tensor([0.3], dtype=torch.float64)}
    whole = PESPool(LocalExecutor(2), est, system, phi)
    ref = [whole.step(phi).grad["theta"] for _ in range(4)]
    first = PESPool(LocalExecutor(2), est, system, phi)
    for _ in range(2):
        first.step(phi)
    saved = type(first.state).from_state_dict(first.checkpoint_state().state_dict())
    resumed = PESPool(LocalExecutor(2), est, system, phi, saved)
    got = [resumed.step(phi).grad["theta"] for _ in range(2)]
    for a, b in zip(got, ref[2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unreachable_ray_address_is_refused_at_once():
    with pytest.raises(WorkerError, match="no Ray head reachable"):
        _probe("127.0.0.1:1", 2.0)
    with pytest.raises(ConfigError, match="executor.address"):
        _probe("nowhere", 2.0)


def test_slices_moved_to_an_explicit_device_equal_the_plain_slices():
    # The GPU-worker path (move φ and tasks to the worker's device, results to CPU)
    # with device="cpu": the same numbers (the CUDA run is in test_cuda_workers.py).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    make = functools.partial(MAML, model, inner_lr=0.05, inner_steps=2, strategy="loop")
    phi = make().outer_parameters()
    x = torch.rand(4, 12, 1, dtype=torch.float64)
    data = (x[:, :6], x[:, :6] ** 2, x[:, 6:], x[:, 6:] ** 2)
    a = learner_meta_gradient(LocalExecutor(2), make, phi, *data, nn.functional.mse_loss)
    b = learner_meta_gradient(LocalExecutor(2), make, phi, *data, nn.functional.mse_loss,
                              device="cpu")
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)
