"""Bounded staleness in the PES pool, against an in-process reference (no Ray needed).

The reference runs the stale schedule directly: truncation ``k`` advances the particles
with ``φ_{max(0, k−s)}`` (the meta-parameters after ``k − s`` SGD updates), its
estimate is formed with the accumulators after truncation ``k − 1`` and applied to
``φ_k``. The pool must reproduce it bitwise for every ``s``, over restarts from its
checkpoint, with any snapshot period and worker count.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from metaopt.bilevel.pes import PES, advance_particles
from metaopt.bilevel.reference_problems import InfluenceBalancing
from metaopt.bilevel.truncation import ConstantLength, TruncatedState
from metaopt.distributed import LocalExecutor
from metaopt.distributed.pes_pool import (
    PESPool,
    pending_from_state_dict,
    pending_state_dict,
)

LR = 0.5
STEPS = 7


def setup() -> tuple[PES, InfluenceBalancing, dict]:
    est = PES(num_tasks=6, truncation=3, sigma=0.1, schedule=ConstantLength(5), seed=3)
    return est, InfluenceBalancing(), {"theta": torch.tensor([0.5], dtype=torch.float64)}


def sgd(phi: dict, grad: dict) -> dict:
    return {k: phi[k] - LR * grad[k] for k in phi}


def stale_reference(s: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Gradients and φ_k of the stale schedule, computed in one process."""
    est, system, phi = setup()
    state = est.start(system, phi, None)
    phis, grads = [phi], []
    for k in range(STEPS):
        seed = est.perturbation_seed(state)  # state.calls == k
        unroll, diffs = advance_particles(system, phis[max(0, k - s)], state.unroll, seed,
                                          est.sigma, est.truncation, est.episode_schedule)
        hg = est.finish(phis[-1], state, unroll, seed, diffs)
        state = hg.state
        grads.append(hg.grad["theta"])
        phis.append(sgd(phis[-1], hg.grad))
    return grads, phis


def run_pool(pool: PESPool, phi: dict, steps: int) -> tuple[list[torch.Tensor], dict]:
    grads = []
    for _ in range(steps):
        hg = pool.step(phi)
        grads.append(hg.grad["theta"])
        phi = sgd(phi, hg.grad)
    return grads, phi


@pytest.mark.parametrize("s", [0, 1, 2])
@pytest.mark.parametrize("workers,sync_every", [(1, 10), (2, 2), (3, 1)])
def test_pool_reproduces_the_stale_schedule_bitwise(s, workers, sync_every):
    ref, phis = stale_reference(s)
    est, system, phi = setup()
    pool = PESPool(LocalExecutor(workers), est, system, phi, sync_every=sync_every,
                   max_staleness=s)
    got, last = run_pool(pool, phi, STEPS)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), (s, k)
    assert torch.equal(last["theta"], phis[-1]["theta"])


def test_zero_staleness_is_plain_pes_and_staleness_changes_the_result():
    est, system, phi = setup()
    state, plain = None, []
    p = phi
    for _ in range(STEPS):
        hg = est(system, p, None, state)
        state, p = hg.state, sgd(p, hg.grad)
        plain.append(hg.grad["theta"])
    assert all(torch.equal(a, b) for a, b in zip(plain, stale_reference(0)[0]))
    # With s = 1 the first two truncations both use φ_0: the second estimate differs.
    assert not torch.equal(stale_reference(1)[0][1], plain[1])


def test_stale_pool_sends_ahead_and_records_bytes():
    est, system, phi = setup()
    pool = PESPool(LocalExecutor(2), est, system, phi, sync_every=100, max_staleness=2)
    run_pool(pool, phi, 3)
    per_truncation = 2 * (8 + 8 + 8)  # φ (1 float64), seed, index to each of 2 workers
    # Step 0 queues truncations 0, 1, 2; each later step queues one more.
    assert [r["sent"] for r in pool.bytes_per_step] == [3 * per_truncation,
                                                        per_truncation, per_truncation]
    # Received: 4 per-task tensors of 6 tasks (3 float64 + 1 bool) per truncation.
    assert {r["received"] for r in pool.bytes_per_step} == {6 * (8 + 8 + 8 + 1)}
    assert len(pool._flights) == 2 and pool.state.calls == 3


@pytest.mark.parametrize("s", [1, 2])
def test_stale_pool_resumes_exactly_from_its_checkpoint(s):
    ref, phis = stale_reference(s)
    est, system, phi = setup()
    first = PESPool(LocalExecutor(2), est, system, phi, sync_every=3, max_staleness=s)
    got, p = run_pool(first, phi, 3)
    # What a runner checkpoint holds: tensors and JSON values only.
    saved = TruncatedState.from_state_dict(first.checkpoint_state().state_dict())
    pending = pending_from_state_dict(pending_state_dict(first.pending(), s, est.num_tasks))
    assert len(pending) == s and saved.calls == 3
    resumed = PESPool(LocalExecutor(2), est, system, p, saved, pending=pending,
                      sync_every=3, max_staleness=s)
    more, last = run_pool(resumed, p, STEPS - 3)
    for k, (a, b) in enumerate(zip(got + more, ref)):
        assert torch.equal(a, b), k
    assert torch.equal(last["theta"], phis[-1]["theta"])


def test_out_of_order_truncation_is_refused_without_changing_the_worker():
    from metaopt.distributed.executor import StateLost
    from metaopt.distributed.pes_pool import _advance, _Step

    est, system, phi = setup()
    ex = LocalExecutor(1)
    pool = PESPool(ex, est, system, phi)
    before = ex._workers[0].store["pes"].unroll
    with pytest.raises(StateLost, match="before truncation 0, got truncation 1"):
        ex.call_each(_advance, [_Step(phi, 0, 1)])
    assert ex._workers[0].store["pes"].unroll is before and ex._workers[0].store["next"] == 0
    assert pool.state.calls == 0


def test_pending_state_dict_has_a_fixed_structure():
    est, system, phi = setup()
    empty = pending_state_dict([], 2, est.num_tasks)
    pool = PESPool(LocalExecutor(1), est, system, phi, max_staleness=2)
    pool.step(phi)
    full = pending_state_dict(pool.pending(), 2, est.num_tasks)
    assert empty.keys() == full.keys() and (empty["count"], full["count"]) == (0, 2)
    for k, v in empty.items():
        if isinstance(v, torch.Tensor):
            assert v.shape == full[k].shape and v.dtype == full[k].dtype, k
    with pytest.raises(ValueError, match="max_staleness"):
        PESPool(LocalExecutor(1), est, system, phi, max_staleness=-1)
    assert replace(pool.state).calls == 1
