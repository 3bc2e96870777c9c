"""How a meta-batch is executed: the memory budget of ``strategy="auto"``, chunking,
and the traced forward that replaces ``functional_call`` where it is exact.

These fail if the budget's choice stops being deterministic or exceeds the budget, if
the loop starts holding more than one task's graph at a time, if any strategy or chunk
size changes a meta-gradient, or if the traced forward is used where it would compute
something other than ``functional_call``.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from maml_reference import (
    classification_batch,
    conv_bn,
    max_rel_diff,
    meta_grads,
    mlp,
    regression_batch,
)
from torch import Tensor, nn

from metaopt.algorithms import ANIL, FOMAML, MAML, MetaSGD, Reptile, iMAML
from metaopt.algorithms._model import FunctionalModel
from metaopt.bilevel.task_batch import (
    TaskBatcher,
    merge_results,
    parse_bytes,
    run_loop,
    run_vmap,
    saved_tensor_bytes,
)


# --------------------------------------------------------------------------- policy
def test_memory_budget_parses_bytes_and_units():
    assert parse_bytes(1000) == 1000
    assert parse_bytes("256MiB") == 256 * 2**20
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("64kib") == 65536
    for bad in ("lots", "12 parsecs", "-1MiB", 0.5, True):
        with pytest.raises((ValueError, TypeError), match="memory_budget"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="memory_budget"):
        MAML(mlp(), memory_budget="big")


def test_auto_measures_one_task_then_vmaps_the_chunk_that_fits_the_budget():
    """First meta-batch: the loop, measuring one task's saved bytes; later ones: vmap
    over ``budget // footprint`` tasks (capped by the batch), the same choice every
    time and in every run."""
    model, batch = mlp(), regression_batch(tasks=6)
    maml = MAML(model, inner_lr=0.05, inner_steps=2)
    ref, _ = meta_grads(MAML(model, inner_lr=0.05, inner_steps=2, strategy="loop"), batch)
    meta_grads(maml, batch)
    assert maml.last_strategy == "loop"
    (sig, footprint), = maml.task_footprints.items()
    # the footprint is the first task's saved-tensor bytes: the same in a fresh learner
    # and what counting one task's forward and backward gives (within a few scalars)
    fresh = MAML(model, inner_lr=0.05, inner_steps=2)
    meta_grads(fresh, batch)
    assert fresh.task_footprints == {sig: footprint}
    task = [t[0] for t in batch]
    phi = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    _, again = saved_tensor_bytes(lambda: maml.task_loss(phi, *task, F.mse_loss).backward())
    assert footprint > 0 and abs(again - footprint) <= 64
    got, _ = meta_grads(maml, batch)
    assert maml.last_strategy == "vmap" and maml._batcher.chunks[sig] == 6
    assert max_rel_diff(got, ref) < 1e-10
    # a budget of 2.5 tasks gives chunks of 2; of 1.5 tasks the loop
    two = MAML(model, inner_lr=0.05, inner_steps=2, memory_budget=int(2.5 * footprint))
    for _ in range(2):
        got, _ = meta_grads(two, batch)
    assert two.last_strategy == "vmap" and two._batcher.chunks[sig] == 2
    assert max_rel_diff(got, ref) < 1e-10
    one = MAML(model, inner_lr=0.05, inner_steps=2, memory_budget=int(1.5 * footprint))
    for _ in range(2):
        meta_grads(one, batch)
    assert one.last_strategy == "loop" and one._batcher.chunks[sig] is None
    capped = MAML(model, inner_lr=0.05, inner_steps=2, chunk_size=4)
    for _ in range(2):
        meta_grads(capped, batch)
    assert capped._batcher.chunks[sig] == 4


@pytest.mark.parametrize("steps", [1, 3])
def test_budget_choice_respects_the_budget(steps):
    """chunk × measured footprint never exceeds the budget, for any budget, and the
    choice depends on nothing but the inputs' signature and the settings."""
    model, batch = mlp(), regression_batch(tasks=8)
    probe = MAML(model, inner_lr=0.05, inner_steps=steps)
    meta_grads(probe, batch)
    (footprint,) = probe.task_footprints.values()
    for tasks_worth in (0.5, 1.0, 2.0, 3.7, 8.0, 100.0):
        budget = int(tasks_worth * footprint)
        chunk = TaskBatcher("auto", budget).choose_chunk(8, footprint)
        assert chunk is None or (2 <= chunk <= 8 and chunk * footprint <= budget)
        assert chunk == (None if tasks_worth < 2 else min(8, int(tasks_worth)))


def test_structural_rules_keep_the_loop():
    from maml_reference import conv_bn

    conv = MAML(conv_bn(), inner_lr=0.4)
    assert conv.vmap_slow(torch.device("cpu")) is not None  # convolutions on CPU
    assert conv.vmap_unsafe() is not None                   # second order through BN
    assert MAML(mlp(), inner_lr=0.4).vmap_slow(torch.device("cpu")) is None
    assert iMAML(mlp()).vmap_unsafe() is not None           # Implicit: one task at a time


def test_merge_of_slices_is_the_whole_batch():
    """What a sharded executor does: slices' mean gradients weighted by their sizes."""
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def task_fn(phi, x, *, functional, checks):
        return (phi["w"] * x).sum() ** 2

    x = torch.randn(7, 3, dtype=torch.float64)
    whole = run_loop(task_fn, {"w": w}, (x,), need_grad=True)
    parts = [run_loop(task_fn, {"w": w}, (x[:3],), need_grad=True),
             run_vmap(task_fn, {"w": w}, (x[3:],), need_grad=True)]
    merged = merge_results(parts)
    assert torch.equal(merged.losses, whole.losses) and merged.strategy == "mixed"
    assert torch.allclose(merged.grads["w"], whole.grads["w"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "all"])
def test_chunk_size_is_validated(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        MAML(mlp(), chunk_size=bad)


def test_strategy_is_validated():
    with pytest.raises(ValueError, match="strategy"):
        TaskBatcher("threads")


@pytest.mark.parametrize("n_tasks,chunk,calls", [(7, None, 1), (7, 3, 3), (7, 1, 7), (4, 9, 1)])
def test_vmap_holds_at_most_chunk_size_tasks_per_call(n_tasks, chunk, calls):
    """The task function is traced once per vmap call, so calls = number of chunks."""
    seen = []
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def task_fn(phi, x, *, functional, checks):
        assert functional == torch._C._functorch.is_batchedtensor(x)
        seen.append(torch._C._functorch.is_batchedtensor(x))
        return (phi["w"] * x).sum() ** 2

    x = torch.randn(n_tasks, 3, dtype=torch.float64)
    result = run_vmap(task_fn, {"w": w}, (x,), need_grad=True, chunk_size=chunk)
    assert seen == [True] * calls
    ref = run_loop(task_fn, {"w": w}, (x,), need_grad=True)
    assert torch.allclose(result.grads["w"], ref.grads["w"], rtol=1e-12, atol=0)


class _Box:
    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class _SavedBytes:
    """Peak bytes of tensors saved for backward that are alive at once (a memory proxy
    that, unlike RSS, is exact and deterministic): pack counts a tensor's bytes until
    autograd drops what it saved."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t: Tensor) -> object:
        box = _Box(t)
        size = t.numel() * t.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._drop, size)
        return box

    def _drop(self, size: int) -> None:
        self.live -= size

    @staticmethod
    def unpack(box: _Box) -> Tensor:
        return box.tensor


def _peak_saved_bytes(algo, batch) -> int:
    probe = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, probe.unpack):
        meta_grads(algo, batch)
    return probe.peak


@pytest.mark.parametrize("make", [
    lambda m: MAML(m, inner_lr=0.05, inner_steps=3, strategy="loop"),
    lambda m: MetaSGD(m, inner_lr=0.05, inner_steps=2, strategy="loop"),
    lambda m: ANIL(m, inner_lr=0.05, inner_steps=2, strategy="loop"),
    lambda m: MAML(m, inner_lr=0.05, inner_steps=3, memory_budget=1),
], ids=["maml", "metasgd", "anil", "auto-small-budget"])
def test_loop_memory_is_one_tasks_whatever_the_meta_batch(make):
    """The loop's peak autograd memory on 8 tasks is that of a single task (within
    1.2x, the benchmark's bound); a loop that kept every task's graph would be ~8x."""
    torch.manual_seed(0)
    model = mlp()
    single = make(model)
    meta_grads(single, regression_batch(tasks=1))  # "auto" measures on its first meta-batch
    one = _peak_saved_bytes(single, regression_batch(tasks=1))
    learner = make(model)
    meta_grads(learner, regression_batch(tasks=8))
    eight = _peak_saved_bytes(learner, regression_batch(tasks=8))
    assert one > 0
    assert eight <= 1.2 * one, (eight, one)


def test_the_memory_proxy_sees_a_meta_batch_whose_graphs_are_alive_together():
    """The check above is not vacuous: one graph over all 8 tasks (what a chunk of 8
    would hold) measures several times one task."""
    model, batch = mlp(), regression_batch(tasks=8)
    maml = MAML(model, inner_lr=0.05, inner_steps=3, strategy="loop")
    one = _peak_saved_bytes(maml, regression_batch(tasks=1))
    probe, phi = _SavedBytes(), dict(model.named_parameters())
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, probe.unpack):
        losses = [maml.task_loss(phi, *(t[i] for t in batch), F.mse_loss, checks=True)
                  for i in range(8)]
        torch.stack(losses).mean().backward()
    assert probe.peak > 4 * one


# --------------------------------------------------------------------------- exactness
ALGOS = {
    "maml": lambda m, **kw: MAML(m, inner_lr=0.05, inner_steps=2, **kw),
    "fomaml": lambda m, **kw: FOMAML(m, inner_lr=0.05, inner_steps=2, **kw),
    "anil": lambda m, **kw: ANIL(m, inner_lr=0.05, inner_steps=2, **kw),
    "metasgd": lambda m, **kw: MetaSGD(m, inner_lr=0.05, inner_steps=2, **kw),
    "reptile": lambda m, **kw: Reptile(m, inner_lr=0.05, inner_steps=2, **kw),
}
SETTINGS = {
    "auto": {},
    "auto-chunk2": {"chunk_size": 2},
    "auto-budget-loop": {"memory_budget": 1},
    "vmap": {"strategy": "vmap"},
    "vmap-chunk2": {"strategy": "vmap", "chunk_size": 2},
    "vmap-chunk1": {"strategy": "vmap", "chunk_size": 1},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_strategy_and_chunk_size_gives_the_loops_meta_gradient(algo, setting):
    model, batch = mlp(), regression_batch(tasks=5)
    ref, ref_loss = meta_grads(ALGOS[algo](model, strategy="loop"), batch)
    learner = ALGOS[algo](model, **SETTINGS[setting])
    for _ in range(2):  # under "auto" the second meta-batch runs the budget's choice
        got, loss = meta_grads(learner, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert max_rel_diff(got, ref) < 1e-10


def test_imaml_is_unchanged_by_the_traced_forward():
    model, batch = mlp(), regression_batch(tasks=3)
    traced = iMAML(model, inner_lr=0.05, inner_steps=3, lam=2.0, cg_steps=4)
    plain = iMAML(model, inner_lr=0.05, inner_steps=3, lam=2.0, cg_steps=4)
    plain._fmodel._configuration.traceable = False  # functional_call only
    got, loss = meta_grads(traced, batch)
    ref, ref_loss = meta_grads(plain, batch)
    assert traced._fmodel._verified and loss == ref_loss
    assert max_rel_diff(got, ref) == 0.0


# --------------------------------------------------------------------------- traced forward
def _functional_call(model: nn.Module, params, x: Tensor) -> Tensor:
    return torch.func.functional_call(model, params, (x,), strict=False)


def test_traced_forward_is_used_for_a_plain_mlp_and_is_bit_identical():
    model = mlp()
    fm = FunctionalModel(model)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x = torch.randn(7, 1, dtype=torch.float64)
    first = fm(params, x)  # verifies the trace against functional_call
    assert fm._verified
    second = fm(params, x)  # runs the trace
    ref = _functional_call(model, params, x)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    g = torch.autograd.grad(second.square().sum(), list(params.values()), create_graph=True)
    g_ref = torch.autograd.grad(ref.square().sum(), list(params.values()), create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref))


def test_traced_forward_handles_tied_weights_without_touching_the_model():
    a, b = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    b.weight = a.weight  # tied: named_parameters() keeps "0.weight" only
    model = nn.Sequential(a, nn.Tanh(), b)
    attrs = {id(m): set(vars(m)) for m in model.modules()}
    fm = FunctionalModel(model)
    params = {k: v.detach() + 0.1 for k, v in model.named_parameters()}
    assert "2.weight" not in params
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(2):
        assert torch.equal(fm(params, x), _functional_call(model, params, x))
    assert fm._verified
    assert {id(m): set(vars(m)) for m in model.modules()} == attrs


class _Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2).double()
        self.lin.register_forward_hook(lambda mod, inp, out: out * 3.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


class _Constant(nn.Module):
    """A plain tensor attribute: read at call time by functional_call, so not traced."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2).double()
        self.offset = torch.ones(2, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + self.offset


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2).double()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        self.count.add_(1.0)
        return self.lin(x)


def test_a_module_with_its_own_forward_is_not_traced():
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2).double()
            self.calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1  # a Python side effect a trace would perform only once
            return self.lin(x)

    model = Counting()
    fm = FunctionalModel(model)
    for _ in range(3):
        fm(dict(model.named_parameters()), torch.ones(1, 2, dtype=torch.float64))
    assert model.calls == 3 and not fm._traces and not fm._verified


@pytest.mark.parametrize("make", [_Hooked, _Branchy, _Constant, _InPlace],
                         ids=["hook", "branch", "constant", "inplace"])
def test_models_the_trace_cannot_reproduce_use_functional_call(make):
    """Modules with their own forward are never traced; here they are let through
    that rule to exercise the checks behind it (hooks, control flow, plain tensor
    attributes, in-place writes), each of which must fall back by itself."""
    model = make()
    fm = FunctionalModel(model)
    fm._configuration.traceable = True
    params = dict(model.named_parameters())
    for sign in (1.0, -1.0, 1.0):
        x = sign * torch.ones(3, 2, dtype=torch.float64)
        assert torch.equal(fm(params, x), _functional_call(model, params, x))
    assert not fm._verified
    if isinstance(model, _InPlace):
        assert float(model.count) == 6.0  # every call wrote once; tracing wrote nothing


def test_batchnorm_in_training_mode_keeps_functional_call_and_its_buffer_rules():
    model = conv_bn()
    fm = FunctionalModel(model)
    params = dict(model.named_parameters())
    x = classification_batch()[0][0]
    before = {k: v.clone() for k, v in model.named_buffers()}
    out = fm(params, x)
    assert torch.equal(out, _functional_call(model, {**fm.buffers(), **params}, x))
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    model.eval()
    assert torch.equal(fm(params, x), _functional_call(model, params, x))


def test_dropout_draws_the_same_numbers_as_functional_call():
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    fm = FunctionalModel(model)
    params = dict(model.named_parameters())
    x = torch.randn(5, 4, dtype=torch.float64)
    outs = []
    for _ in range(3):
        torch.manual_seed(3)
        outs.append(fm(params, x))
    torch.manual_seed(3)
    ref = _functional_call(model, params, x)
    assert all(torch.equal(o, ref) for o in outs)
    model.eval()  # a new mode is traced and verified on its own
    assert torch.equal(fm(params, x), _functional_call(model, params, x))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make", [
    lambda m: MAML(m, inner_lr=0.05, inner_steps=2),
    lambda m: ANIL(m, inner_lr=0.05, inner_steps=2),
    lambda m: Reptile(m, inner_lr=0.05, inner_steps=2),
], ids=["maml", "anil", "reptile"])
def test_a_bad_task_is_still_named_by_inner_step_after_the_unchecked_fast_pass(make):
    from metaopt.params import NonFiniteError

    sx, sy, qx, qy = regression_batch(tasks=4)
    sy = sy.clone()
    sy[2, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="inner step 0"):
        make(mlp()).meta_loss(sx, sy, qx, qy, F.mse_loss)


def test_a_changed_attribute_or_a_new_hook_after_tracing_is_honoured():
    model = nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU(0.1), nn.Linear(2, 2)).double()
    fm = FunctionalModel(model)
    params = dict(model.named_parameters())
    x = torch.randn(3, 2, dtype=torch.float64)
    for _ in range(2):
        assert torch.equal(fm(params, x), _functional_call(model, params, x))
    assert fm._verified
    model[1].negative_slope = 0.5  # baked into the first trace: traced anew
    for _ in range(2):
        assert torch.equal(fm(params, x), _functional_call(model, params, x))
    assert len(fm._verified) == 2
    handle = model[0].register_forward_hook(lambda mod, inp, out: out + 1.0)
    assert torch.equal(fm(params, x), _functional_call(model, params, x))
    handle.remove()
    assert torch.equal(fm(params, x), _functional_call(model, params, x))


def test_vmap_refuses_a_nonfinite_meta_gradient_naming_the_tensor():
    from metaopt.params import NonFiniteError

    phi = {"w": torch.ones(3, requires_grad=True), "b": torch.zeros(1, requires_grad=True)}
    tasks = [torch.tensor([[1.0, 2.0, 3.0], [1.0, float("inf"), 0.0]])]

    def task_fn(p, x, *, functional, checks):
        return (p["w"] * x).sum() + p["b"].sum()

    with pytest.raises(NonFiniteError, match="meta-gradient for 'w'"):
        run_vmap(task_fn, phi, tasks, need_grad=True)
    ok = run_vmap(task_fn, phi, [torch.ones(2, 3)], need_grad=True)
    assert torch.equal(ok.grads["w"], torch.ones(3)) and torch.equal(ok.grads["b"], torch.ones(1))
