"""Truncated unrolls: what the truncated estimators (TBPTT, ES, PES) share.

Long inner problems (a learned optimizer training a network for 1,000 steps) are
meta-trained in *truncations*: each outer step advances every inner problem by a few
steps and estimates the meta-gradient from just those steps, carrying the inner state
to the next outer step. What is carried is an :class:`UnrollState` — per task: the
inner system's state (parameters, optimizer state), the inner step reached, the
episode's horizon and the seed the task was drawn with. When a task reaches its
horizon it is redrawn (a new seed, a new horizon from the :class:`TruncationSchedule`)
and its state re-initialised; tasks start at staggered offsets so they do not all
reset in the same outer step.

The inner problems are an :class:`InnerSystem`: ``N`` independent problems of one
structure advanced together, every tensor with a leading row dimension ``N``. A row
is a (copy, task) pair: truncated BPTT runs one copy of each task, antithetic ES/PES
two (the ``+ε`` and ``−ε`` particles of each task; rows ``[0, T)`` and ``[T, 2T)``).
Copies of a task share its seed, step counter and data, so they reset together.
:func:`advance` runs one truncation and records the per-step losses; estimators turn
those into gradients. :class:`BilevelSystem` makes any deterministic
:class:`~metaopt.bilevel.BilevelProblem` an inner system (``vmap`` over rows).

Non-finite values never reach a meta-gradient: a row whose step loss is NaN/inf has
that loss zeroed (in every copy of its task), its task is reset at the next step, and
``diagnostics["nonfinite_resets"]`` counts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from metaopt.bilevel.problem import BilevelProblem, InitialTheta
from metaopt.optim.base import apply_updates
from metaopt.params import Params
from metaopt.tree import tree_leaves, tree_rebuild

__all__ = [
    "LOG_LOSS_FLOOR",
    "SEGMENT_OBJECTIVES",
    "BilevelSystem",
    "ConstantLength",
    "InnerSystem",
    "LogUniformLength",
    "TruncatedEstimator",
    "TruncatedState",
    "TruncationRecord",
    "TruncationSchedule",
    "UnrollState",
    "advance",
    "antithetic_rows",
    "detach_state",
    "draw_task",
    "init_unroll",
    "mix_seed",
    "per_task_sums",
    "perturbations",
    "rows_of",
    "select_rows",
]

State = Any

#: How a truncation's per-step losses become its objective (see :func:`per_task_sums`).
SEGMENT_OBJECTIVES = ("mean", "log_mean")
#: Segment mean losses below this count as this under ``"log_mean"`` (log of zero).
LOG_LOSS_FLOOR = 1e-8


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 over them): deterministic, well spread."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & 0x7FFFFFFFFFFFFFFF


def perturbations(phi: Mapping[str, Tensor], seed: int, sigma: float, num: int) -> Params:
    """``σ·ε`` for ``num`` rows, ε ~ N(0, I) shaped like φ: leaves ``[num, ...]``.

    Drawn from one CPU generator seeded with ``seed`` (keys in φ's order, float64, then
    cast to φ's dtype and device), so the same seed gives the same perturbations in
    every process — a distributed pool sends the seed, not the tensors, and a worker
    holding rows ``[a, b)`` takes that slice.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return {k: (sigma * torch.randn((num, *v.shape), generator=gen, dtype=torch.float64)
                ).to(dtype=v.dtype, device=v.device) for k, v in phi.items()}


def _uniform(seed: int) -> float:
    """A uniform number in [0, 1) from a mixed seed (53 bits)."""
    return (seed >> 10) / float(1 << 53)


# --------------------------------------------------------------------- schedules
class TruncationSchedule(Protocol):
    """Draws episode lengths (inner horizons) for newly sampled tasks."""

    max_length: int

    def length_at(self, u: float) -> int:
        """The episode length at quantile ``u`` ∈ [0, 1)."""
        ...


@dataclass(frozen=True)
class ConstantLength:
    """Every episode has ``length`` inner steps."""

    length: int

    def __post_init__(self) -> None:
        if int(self.length) < 1:
            raise ValueError(f"episode length must be >= 1, got {self.length}")

    @property
    def max_length(self) -> int:
        return int(self.length)

    def length_at(self, u: float) -> int:
        return int(self.length)


@dataclass(frozen=True)
class LogUniformLength:
    """Episode lengths log-uniform in ``[low, high]`` (μLO/learned_optimization: 100–1000)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= int(self.low) <= int(self.high):
            raise ValueError(f"need 1 <= low <= high, got low={self.low}, high={self.high}")

    @property
    def max_length(self) -> int:
        return int(self.high)

    def length_at(self, u: float) -> int:
        lo, hi = math.log(self.low), math.log(self.high)
        return min(int(self.high), max(int(self.low), round(math.exp(lo + u * (hi - lo)))))


# --------------------------------------------------------------------- systems
class InnerSystem(Protocol):
    """``N`` inner problems of one structure, advanced one step at a time.

    ``phi`` passed to both methods has one row per problem (leaves ``[N, ...]``: the
    meta-parameters each row runs with, e.g. perturbed for ES). ``seeds`` (``[N]``
    long) name each row's task (its data and initialisation); ``steps`` (``[N]``
    long) is each row's inner step within its episode. States are nested dicts whose
    tensor leaves have a leading dimension ``N`` (static leaves are shared).
    """

    def init(self, phi: Params, seeds: Tensor) -> State: ...

    def step(self, phi: Params, state: State, seeds: Tensor, steps: Tensor
             ) -> tuple[State, Tensor]:
        """One inner step for every row: the new state and each row's loss ``[N]``
        (the meta-objective's term for this step)."""
        ...


def rows_of(phi: Mapping[str, Tensor], n: int) -> Params:
    """φ repeated as ``n`` rows (a differentiable broadcast)."""
    return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in phi.items()}


def select_rows(mask: Tensor, new: State, old: State) -> State:
    """Row-wise ``where(mask, new, old)`` over the tensor leaves of two states."""
    keys, new_leaves = tree_leaves(new)
    _, old_leaves = tree_leaves(old)
    if len(new_leaves) != len(old_leaves):
        raise ValueError(f"states differ in structure ({len(new_leaves)} vs "
                         f"{len(old_leaves)} tensors)")
    out = []
    for key, a, b in zip(keys, new_leaves, old_leaves):
        if a.shape != b.shape:
            raise ValueError(f"state tensor '{key}' changed shape: {tuple(b.shape)} -> "
                             f"{tuple(a.shape)}")
        m = mask.reshape(-1, *([1] * (a.dim() - 1))).to(a.device)
        out.append(torch.where(m, a, b))
    return tree_rebuild(old, out)


@dataclass
class BilevelSystem:
    """A deterministic :class:`BilevelProblem` as an :class:`InnerSystem`.

    Each row runs the problem's inner optimizer from ``theta0`` with its own φ row
    (``torch.func.vmap`` over rows); the loss of a step is the outer objective at the
    parameters reached after it (``objective="outer"``) or the inner loss before it
    (``objective="inner"``). The problem's minibatch functions, if any, are called with
    the inner step, the same for every row; ``seeds`` are not used (one task).
    """

    problem: BilevelProblem
    theta0: InitialTheta
    objective: str = "outer"

    def __post_init__(self) -> None:
        if self.objective not in ("outer", "inner"):
            raise ValueError(f"objective must be 'outer' or 'inner', got {self.objective!r}")

    def init(self, phi: Params, seeds: Tensor) -> State:
        def one(phi_row: Params) -> State:
            theta = self.theta0(phi_row) if callable(self.theta0) else dict(self.theta0)
            return {"theta": dict(theta),
                    "opt": self.problem.optimizer_for(phi_row).init(dict(theta))}

        return torch.func.vmap(one, randomness="error")(phi)

    def step(self, phi: Params, state: State, seeds: Tensor, steps: Tensor
             ) -> tuple[State, Tensor]:
        problem = self.problem
        step = int(steps.max()) if steps.numel() else 0
        in_batch = problem.inner_batch(step)
        out_batch = problem.outer_batch(step)

        def one(phi_row: Params, st: State) -> tuple[State, Tensor]:
            theta, opt_state = st["theta"], st["opt"]
            opt = problem.optimizer_for(phi_row)
            grads, loss = torch.func.grad_and_value(
                lambda th: problem.inner_value(th, phi_row, in_batch))(dict(theta))
            if opt.needs_loss:
                updates, opt_state = opt.update(grads, opt_state, theta, loss=loss)
            else:
                updates, opt_state = opt.update(grads, opt_state, theta)
            theta = apply_updates(theta, updates)
            if self.objective == "outer":
                loss = problem.outer_value(theta, phi_row, out_batch)
            return {"theta": theta, "opt": opt_state}, loss

        return torch.func.vmap(one, randomness="error")(phi, state)


# --------------------------------------------------------------------- unroll state
@dataclass
class UnrollState:
    """Per-task progress carried across truncations (``T`` task slots, ``C`` copies).

    Attributes:
        inner: the inner system's state, ``C·T`` rows (copy-major).
        step: ``[T]`` inner step reached in the current episode.
        horizon: ``[T]`` the current episode's length.
        seed: ``[T]`` the seed the current task was drawn with.
        slot: ``[T]`` each slot's index in the whole run (a shard keeps its slots').
        episode: ``[T]`` episodes each slot has started; a slot's next task (seed and
            horizon) derives from ``(base_seed, slot, episode)`` alone, so it is the
            same however the slots are split across processes.
        base_seed: the run's seed for tasks and horizons.
        copies: ``C`` (1 for truncated BPTT, 2 for antithetic ES/PES).
    """

    inner: State
    step: Tensor
    horizon: Tensor
    seed: Tensor
    slot: Tensor
    episode: Tensor
    base_seed: int
    copies: int

    @property
    def num_tasks(self) -> int:
        return int(self.step.numel())

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON values only (for the runner's checkpoints)."""
        return {"inner": self.inner, "step": self.step, "horizon": self.horizon,
                "seed": self.seed, "slot": self.slot, "episode": self.episode,
                "base_seed": self.base_seed, "copies": self.copies}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> UnrollState:
        return cls(inner=d["inner"], step=d["step"], horizon=d["horizon"], seed=d["seed"],
                   slot=d["slot"], episode=d["episode"], base_seed=int(d["base_seed"]),
                   copies=int(d["copies"]))

    def rows(self, tasks: slice) -> UnrollState:
        """The slots ``tasks`` (a slice of ``[0, T)``) with their rows of every copy."""
        T = self.num_tasks
        idx = torch.arange(T)[tasks]
        row_idx = torch.cat([idx + c * T for c in range(self.copies)])
        _, leaves = tree_leaves(self.inner)
        inner = tree_rebuild(self.inner, [v[row_idx] for v in leaves])
        return UnrollState(inner=inner, step=self.step[idx], horizon=self.horizon[idx],
                           seed=self.seed[idx], slot=self.slot[idx],
                           episode=self.episode[idx], base_seed=self.base_seed,
                           copies=self.copies)

    @staticmethod
    def cat(parts: list[UnrollState]) -> UnrollState:
        """Join consecutive slot ranges (the inverse of :meth:`rows`)."""
        first = parts[0]
        C = first.copies
        leaves_per = [tree_leaves(p.inner)[1] for p in parts]
        joined = []
        for i in range(len(leaves_per[0])):
            # Explicit sizes: a leaf with no elements (an empty optimizer state) has no -1.
            chunks = [lv[i].reshape(C, lv[i].shape[0] // C, *lv[i].shape[1:])
                      for lv in leaves_per]
            joined.append(torch.cat(chunks, 1).flatten(0, 1))
        return UnrollState(
            inner=tree_rebuild(first.inner, joined),
            **{k: torch.cat([getattr(p, k) for p in parts])
               for k in ("step", "horizon", "seed", "slot", "episode")},
            base_seed=first.base_seed, copies=C)


def draw_task(base_seed: int, slot: int, episode: int,
              schedule: TruncationSchedule) -> tuple[int, int]:
    """The seed and horizon of a slot's ``episode``-th task."""
    return (mix_seed(base_seed, 1, slot, episode),
            schedule.length_at(_uniform(mix_seed(base_seed, 2, slot, episode))))


def init_unroll(system: InnerSystem, phi: Mapping[str, Tensor], *, num_tasks: int,
                schedule: TruncationSchedule, seed: int, copies: int = 1,
                stagger: bool = True, slots: Tensor | None = None) -> UnrollState:
    """Fresh tasks for every slot, initialised with the unperturbed φ.

    With ``stagger`` each task's step counter starts at a uniform offset in
    ``[0, horizon)`` (its first episode is that much shorter), so the tasks reach
    their horizons at different outer steps. ``slots``: the slots' run-wide indices
    (default ``0 … num_tasks − 1``; a shard passes its own).
    """
    if num_tasks < 1 or copies < 1:
        raise ValueError(f"num_tasks and copies must be >= 1, got {num_tasks}, {copies}")
    slot = torch.arange(num_tasks) if slots is None else slots.to(torch.long)
    drawn = [draw_task(seed, int(s), 0, schedule) for s in slot]
    seeds = torch.tensor([d[0] for d in drawn], dtype=torch.long)
    horizons = torch.tensor([d[1] for d in drawn], dtype=torch.long)
    with torch.no_grad():
        phi_rows = rows_of({k: v.detach() for k, v in phi.items()}, copies * num_tasks)
        inner = system.init(phi_rows, seeds.repeat(copies))
    if stagger:
        offsets = [_uniform(mix_seed(seed, 3, int(s))) for s in slot]
        step = (torch.tensor(offsets, dtype=torch.float64) * horizons).long()
    else:
        step = torch.zeros(num_tasks, dtype=torch.long)
    return UnrollState(inner=inner, step=step, horizon=horizons, seed=seeds, slot=slot,
                       episode=torch.ones(num_tasks, dtype=torch.long),
                       base_seed=int(seed), copies=int(copies))


@dataclass
class TruncationRecord:
    """What one truncation produced, for the estimators.

    Attributes:
        losses: ``[L, C·T]`` each row's loss at each of the ``L`` steps (non-finite
            ones zeroed).
        after_reset: ``[L, T]`` whether the task was reset at or before that step
            within this truncation (its loss then depends only on this truncation's φ).
        reset: ``[T]`` whether the task was reset during this truncation.
        nonfinite: ``[T]`` how many step losses of the task were non-finite.
    """

    losses: Tensor
    after_reset: Tensor
    reset: Tensor
    nonfinite: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


def advance(system: InnerSystem, phi_rows: Params, unroll: UnrollState, length: int,
            schedule: TruncationSchedule, *, reset_phi_rows: Params | None = None
            ) -> tuple[UnrollState, TruncationRecord]:
    """Run ``length`` inner steps on every row, resetting tasks that finish.

    ``phi_rows`` (leaves ``[C·T, ...]``) is what each row steps with; it may carry an
    autograd graph (truncated BPTT). Resets initialise with ``reset_phi_rows``
    (default ``phi_rows``). The returned state's tensors carry whatever graph the steps
    built; the caller detaches them.
    """
    if length < 1:
        raise ValueError(f"truncation length must be >= 1, got {length}")
    reset_phi_rows = phi_rows if reset_phi_rows is None else reset_phi_rows
    T, C = unroll.num_tasks, unroll.copies
    inner = unroll.inner
    step, horizon, seed, episode = (unroll.step.clone(), unroll.horizon.clone(),
                                    unroll.seed.clone(), unroll.episode.clone())
    reset_seen = torch.zeros(T, dtype=torch.bool)
    nonfinite = torch.zeros(T, dtype=torch.long)
    losses, after = [], []
    for _ in range(length):
        done = step >= horizon
        if bool(done.any()):
            for t in done.nonzero().flatten().tolist():
                seed[t], horizon[t] = draw_task(unroll.base_seed, int(unroll.slot[t]),
                                                int(episode[t]), schedule)
                episode[t] += 1
                step[t] = 0
            fresh = system.init(reset_phi_rows, seed.repeat(C))
            inner = select_rows(done.repeat(C), fresh, inner)
            reset_seen = reset_seen | done
        inner, loss = system.step(phi_rows, inner, seed.repeat(C), step.repeat(C))
        if loss.shape != (C * T,):
            raise ValueError(f"inner system returned losses of shape {tuple(loss.shape)}, "
                             f"expected ({C * T},)")
        bad = (~torch.isfinite(loss.detach())).reshape(C, T).any(0)
        if bool(bad.any()):
            nonfinite += bad.long()
            loss = torch.where(bad.repeat(C), torch.zeros((), dtype=loss.dtype), loss)
            step = torch.where(bad, horizon, step + 1)  # reset at the next step
        else:
            step = step + 1
        losses.append(loss)
        after.append(reset_seen.clone())
    new_state = UnrollState(inner=inner, step=step, horizon=horizon, seed=seed,
                            slot=unroll.slot, episode=episode, base_seed=unroll.base_seed,
                            copies=C)
    record = TruncationRecord(
        losses=torch.stack(losses), after_reset=torch.stack(after), reset=reset_seen,
        nonfinite=nonfinite,
        diagnostics={"resets": int(reset_seen.sum()), "nonfinite_resets": int(
            (nonfinite > 0).sum()), "mean_inner_step": float(step.double().mean())})
    return new_state, record


def detach_state(unroll: UnrollState) -> UnrollState:
    """The state with every tensor detached (the truncation boundary)."""
    _, leaves = tree_leaves(unroll.inner)
    return replace(unroll, inner=tree_rebuild(unroll.inner, [v.detach() for v in leaves]))


@dataclass
class TruncatedState:
    """A truncated estimator's state between calls (pass ``hg.state`` back in).

    ``accumulator`` is PES's per-task sum of perturbations (leaves ``[T, ...]``);
    ``calls`` counts estimates made (perturbation seeds derive from it).
    """

    unroll: UnrollState
    calls: int = 0
    accumulator: Params | None = None

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON values only (for the runner's checkpoints)."""
        return {"unroll": self.unroll.state_dict(), "calls": self.calls,
                "accumulator": self.accumulator}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> TruncatedState:
        return cls(unroll=UnrollState.from_state_dict(d["unroll"]), calls=int(d["calls"]),
                   accumulator=None if d.get("accumulator") is None
                   else dict(d["accumulator"]))


@dataclass(frozen=True)
class TruncatedEstimator:
    """Settings every truncated estimator shares.

    Args:
        num_tasks: inner problems advanced in parallel (``T``).
        truncation: inner steps per estimate.
        schedule: episode lengths of new tasks (default: one truncation per episode).
        seed: seed of tasks, horizons, offsets and perturbations.
        stagger: start tasks at random offsets into their first episode.
        segment_objective: how each truncation's step losses become its objective:
            ``"mean"`` (the mean step loss, default) or ``"log_mean"`` (the log of the
            mean loss of each episode's steps in it; see :func:`per_task_sums`).

    Called as every estimator is, ``est(problem, phi, theta0, state)``: ``problem`` is
    an :class:`InnerSystem`, or a :class:`~metaopt.bilevel.BilevelProblem` (then run
    as a :class:`BilevelSystem` from ``theta0``). The returned
    :class:`~metaopt.bilevel.Hypergradient` carries the :class:`TruncatedState` to
    pass back next call (``theta`` is empty: there is one per task, in the state).
    """

    num_tasks: int = 8
    truncation: int = 50
    schedule: TruncationSchedule | None = None
    seed: int = 0
    stagger: bool = True
    segment_objective: str = "mean"

    copies: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.segment_objective not in SEGMENT_OBJECTIVES:
            raise ValueError(f"segment_objective must be one of {SEGMENT_OBJECTIVES}, got "
                             f"{self.segment_objective!r}")
        if int(self.num_tasks) < 1:
            raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")
        if int(self.truncation) < 1:
            raise ValueError(f"truncation must be >= 1, got {self.truncation}")

    @property
    def episode_schedule(self) -> TruncationSchedule:
        return self.schedule if self.schedule is not None else ConstantLength(self.truncation)

    def system_for(self, problem: InnerSystem | BilevelProblem,
                   theta0: InitialTheta | None) -> InnerSystem:
        if isinstance(problem, BilevelProblem):
            if theta0 is None:
                raise ValueError(f"{problem.name}: a BilevelProblem needs theta0")
            return BilevelSystem(problem, theta0)
        return problem

    def start(self, system: InnerSystem, phi: Mapping[str, Tensor],
              state: TruncatedState | None) -> TruncatedState:
        """``state``, or fresh tasks when it is None."""
        if state is not None:
            if not isinstance(state, TruncatedState):
                raise TypeError(f"state must be a TruncatedState (hg.state), got "
                                f"{type(state).__name__}")
            if state.unroll.num_tasks != self.num_tasks or state.unroll.copies != self.copies:
                raise ValueError(f"state holds {state.unroll.num_tasks} tasks x "
                                 f"{state.unroll.copies} copies; this estimator runs "
                                 f"{self.num_tasks} x {self.copies}")
            return state
        unroll = init_unroll(system, phi, num_tasks=self.num_tasks,
                             schedule=self.episode_schedule, seed=self.seed,
                             copies=self.copies, stagger=self.stagger)
        return TruncatedState(unroll=unroll)

    def perturbation_seed(self, state: TruncatedState) -> int:
        """The seed of this call's perturbations (all tasks; see :func:`perturbations`)."""
        return mix_seed(state.unroll.base_seed, 4, state.calls)


def antithetic_rows(phi: Mapping[str, Tensor], perts: Params) -> Params:
    """Rows ``[φ + ε_t for t] + [φ − ε_t for t]`` (copy-major, as the unroll state)."""
    return {k: torch.cat([v.detach() + perts[k], v.detach() - perts[k]])
            for k, v in phi.items()}


def per_task_sums(record: TruncationRecord, copies: int, length: int,
                  objective: str = "mean") -> tuple[Tensor, Tensor]:
    """Each row's truncation objective, split into the part before the task's first
    reset in the truncation and the part after it: ``(before [C, T], after [C, T])``.

    A *segment* is the steps of one side of that split (one episode's steps in the
    truncation). ``objective``:

    * ``"mean"``: a segment's step losses summed and divided by ``length`` (the two
      parts add up to the truncation's mean loss per step);
    * ``"log_mean"``: ``(n / length) · log(mean loss of the segment's n steps)``
      (floored at :data:`LOG_LOSS_FLOOR`; 0 for an empty segment). Unlike the mean of
      per-step logs it counts a rare loss spike as the mean of a training run's last
      steps does: one step at 10⁻² among steps at 10⁻⁵ moves the log of their mean by
      far more than its share of the mean of logs. Still a sum over segments of
      functions of the trajectory, so ES/PES stay unbiased for it.

    Non-finite steps arrive zeroed in every copy (see :func:`advance`) and count as
    zero loss in both.
    """
    if objective not in SEGMENT_OBJECTIVES:
        raise ValueError(f"objective must be one of {SEGMENT_OBJECTIVES}, got {objective!r}")
    L, rows = record.losses.shape
    losses = record.losses.reshape(L, copies, rows // copies)
    after = record.after_reset.unsqueeze(1).to(losses.dtype)
    parts = []
    for mask in (1 - after, after):
        total = (losses * mask).sum(0)
        if objective == "mean":
            parts.append(total / length)
            continue
        n = mask.sum(0)
        mean = total / n.clamp_min(1)
        logged = mean.clamp_min(LOG_LOSS_FLOOR).log() * (n / length)
        parts.append(torch.where(n > 0, logged, torch.zeros((), dtype=losses.dtype)))
    return parts[0], parts[1]
