"""Meta-training learned optimizers: a task and a learned optimizer as an inner system.

:class:`LearnedOptimizerSystem` is the :class:`~metaopt.bilevel.truncation.InnerSystem`
the truncated estimators (:class:`~metaopt.bilevel.PES`, :class:`~metaopt.bilevel.ES`,
:class:`~metaopt.bilevel.TruncatedBPTT`) unroll: every row trains one copy of a task's
model with the learned optimizer, running with that row's meta-parameters φ (the
optimizer's ``named_parameters()``; perturbed per particle for ES/PES). The
meta-objective's term for a step is the training loss before it (learned_optimization's
default), optionally clipped (``max_loss``) so a diverging particle cannot dominate
the loss differences.

Rows are batched as tensors: ``torch.func.vmap`` over rows of the task's gradient and
the optimizer's pure step (:meth:`~metaopt.lopt.LearnedOptimizer.update_unchecked`;
the estimator guards the batch). ``batched=False`` runs the same per-row function in a
Python loop — the reference the batched path is tested equal to, and the baseline of
``scripts/bench_lopt_metatrain.py``. ``backend="cpu_kernels"`` (chosen once, explicitly)
steps the rows through the optimizer's fused kernels
(:meth:`~metaopt.lopt.LearnedOptimizer.update_rows`) wherever that is defined — no
autograd graph (ES/PES, not truncated BPTT), float32 CPU vectors and matrices — and
the vmapped reference everywhere else; tested equal to it to float32 rounding. That
path takes every row's task gradient from one backward pass through the sum of the
vmapped per-row losses (:meth:`LearnedOptimizerSystem._row_grads`).

A task is anything with ``init_params(gen)``, ``loss(params, batch)``,
``sample_batch(gen, split)`` and optional ``mup_scales`` (``tasks.lopt_tasks.LoptTask``).
Row ``r``'s data at inner step ``k`` is drawn from a generator seeded by its task seed
and ``k``, so the ``+`` and ``−`` particles of a task see the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.bilevel.truncation import LOG_LOSS_FLOOR, mix_seed
from metaopt.lopt.base import LearnedOptimizer
from metaopt.lopt.cpu_kernels import select_backend
from metaopt.lopt.mulo import MuSmallFC, MuVeLO
from metaopt.params import Params
from metaopt.tree import tree_leaves, tree_rebuild

__all__ = ["LOG_LOSS_FLOOR", "META_LOSSES", "LearnedOptimizerSystem", "init_kwargs",
           "meta_parameters"]

#: The per-step meta-objective terms :class:`LearnedOptimizerSystem` offers.
META_LOSSES = ("loss", "log")


def init_kwargs(lopt: LearnedOptimizer, task: Any) -> dict[str, Any]:
    """Extra ``lopt.init`` arguments a task calls for: its μP scales, for the μLO
    architectures (whose ``init`` takes ``mup_scales``)."""
    scales = getattr(task, "mup_scales", None)
    if scales is not None and isinstance(lopt, (MuSmallFC, MuVeLO)):
        return {"mup_scales": scales}
    return {}


def meta_parameters(lopt: LearnedOptimizer) -> Params:
    """The learned optimizer's meta-parameters φ as a detached dict."""
    return {k: v.detach().clone() for k, v in lopt.named_parameters()}


@dataclass
class LearnedOptimizerSystem:
    """Rows of (task model, learned-optimizer state) stepped by the learned optimizer.

    Args:
        lopt: the learned optimizer (its module parameters are not used; φ rows are).
        task: the inner task (see the module docstring).
        num_steps: the horizon passed to ``lopt.init`` (the schedule's longest episode).
        max_loss: clip each step's loss to at most this (None: no clipping).
        batched: vmap over rows (default) or loop over them.
        backend: the optimizer step's backend, ``"reference"`` (default) or
            ``"cpu_kernels"`` (see the module docstring; ``batched`` rows only).
        meta_loss: each step's meta-objective term: ``"loss"`` (the training loss,
            default) or ``"log"`` (its logarithm, floored at :data:`LOG_LOSS_FLOOR`,
            after ``max_loss``): every factor of loss reduction counts the same, so
            tasks whose loss ends near zero are not drowned by high-loss ones.
    """

    lopt: LearnedOptimizer
    task: Any
    num_steps: int
    max_loss: float | None = None
    batched: bool = True
    backend: str = "reference"
    meta_loss: str = "loss"

    def __post_init__(self) -> None:
        if self.meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {self.meta_loss!r}")
        self._template: Any = None
        self._kern = select_backend(self.backend)

    # -- one row ----------------------------------------------------------------------
    def _init_row(self, seed: int) -> dict[str, Any]:
        theta = self.task.init_params(torch.Generator().manual_seed(int(seed)))
        return {"theta": theta, "opt": self.lopt.init(theta, int(self.num_steps),
                                                      **init_kwargs(self.lopt, self.task))}

    def _row_step(self, phi_row: Params, leaves: list[Tensor], batch: tuple
                  ) -> tuple[list[Tensor], Tensor]:
        state = tree_rebuild(self._template, leaves)
        theta, opt_state = state["theta"], state["opt"]
        grads, loss = torch.func.grad_and_value(self.task.loss)(theta, batch)
        new_theta, new_opt = torch.func.functional_call(
            self.lopt, phi_row, ("update_unchecked", grads, opt_state, theta, loss))
        _, new_leaves = tree_leaves({"theta": new_theta, "opt": new_opt})
        return new_leaves, loss

    # -- InnerSystem --------------------------------------------------------------------
    def init(self, phi: Params, seeds: Tensor) -> Any:
        rows = [self._init_row(int(s)) for s in seeds]
        self._template = rows[0]
        _, first = tree_leaves(rows[0])
        per_row = [tree_leaves(r)[1] for r in rows]
        stacked = [torch.stack([lv[i] for lv in per_row]) for i in range(len(first))]
        return tree_rebuild(rows[0], stacked)

    def _batches(self, seeds: Tensor, steps: Tensor) -> tuple:
        cache: dict[tuple[int, int], tuple] = {}
        out = []
        for s, k in zip(seeds.tolist(), steps.tolist()):
            if (s, k) not in cache:
                gen = torch.Generator().manual_seed(mix_seed(s, 5, k))
                cache[(s, k)] = self.task.sample_batch(gen, "train")
            out.append(cache[(s, k)])
        return tuple(torch.stack([b[j] for b in out]) for j in range(len(out[0])))

    def step(self, phi: Params, state: Any, seeds: Tensor, steps: Tensor
             ) -> tuple[Any, Tensor]:
        if self._template is None:
            self._template = self._init_row(int(seeds[0]))
        batch = self._batches(seeds, steps)
        theta, opt_state = state["theta"], state["opt"]
        if self.batched and self.lopt.rows_supported(self._kern, theta, opt_state):
            grads, loss = self._row_grads(theta, batch)
            new_theta, new_opt = self.lopt.update_rows(phi, grads, opt_state, theta, self._kern)
            # (update_rows keeps the trees' key order: the same structure as ``state``)
            return self._clip({**state, "theta": new_theta, "opt": new_opt}, loss)
        _, leaves = tree_leaves(state)
        if self.batched:
            new_leaves, loss = torch.func.vmap(self._row_step, randomness="error")(
                phi, leaves, batch)
        else:
            outs = [self._row_step({k: v[r] for k, v in phi.items()},
                                   [lv[r] for lv in leaves], tuple(b[r] for b in batch))
                    for r in range(len(seeds))]
            new_leaves = [torch.stack([o[0][i] for o in outs]) for i in range(len(leaves))]
            loss = torch.stack([o[1] for o in outs])
        return self._clip(tree_rebuild(state, new_leaves), loss)

    def _clip(self, state: Any, loss: Tensor) -> tuple[Any, Tensor]:
        if self.max_loss is not None:
            loss = loss.clamp(max=self.max_loss)
        if self.meta_loss == "log":
            loss = loss.clamp_min(LOG_LOSS_FLOOR).log()
        return state, loss

    def _row_grads(self, theta: Params, batch: tuple) -> tuple[Params, Tensor]:
        """Every row's task gradient and loss: reverse mode through the sum of the
        vmapped per-row losses. Row ``r``'s loss depends on row ``r`` of ``theta`` only,
        so the gradient of the sum with respect to that row is row ``r``'s own gradient
        (what ``vmap(grad_and_value(loss))`` gives, tested equal; one backward pass
        without the per-row ``grad`` transform's overhead)."""
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}
            loss = torch.func.vmap(self.task.loss, randomness="error")(leaves, batch)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True,
                                        materialize_grads=True)
        return dict(zip(leaves, grads)), loss.detach()
