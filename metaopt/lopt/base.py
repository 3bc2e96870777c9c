"""The contract every learned optimizer architecture follows.

A learned optimizer is an ``nn.Module`` whose parameters are the *meta*-parameters
(the weights of the per-parameter MLP, the LSTM, …), plus two pure functions over the
*task* parameters:

* ``init(params, num_steps) -> state`` — optimizer state for a task model;
* ``update(grads, state, params, loss=None) -> (new_params, new_state)`` — one step.

Both are pure in the task tensors (nothing is mutated), so meta-training can
differentiate through ``update`` (truncated BPTT) or perturb the meta-parameters
(ES/PES) without touching the module: ``lopt.call(meta_params, "update", ...)`` runs a
method under :func:`torch.func.functional_call`. ``state`` is a nested dict of tensors
(and ints/floats) so it serialises without pickling.

Two faces are built on this contract, once, for all architectures:

* :meth:`LearnedOptimizer.as_transformation` — a
  :class:`~metaopt.optim.base.GradientTransformation` (returns *updates*, reads the loss
  when ``needs_loss``), so a learned optimizer is the ``inner_optimizer`` of any
  :class:`~metaopt.bilevel.BilevelProblem`;
* :meth:`LearnedOptimizer.optimizer` — the ``torch.optim`` shell
  (:mod:`metaopt.lopt.torch_optimizer`), which steps in place.

Every step (both faces, both backends) is guarded the same way before any state is
written: the loss must be a scalar; a non-finite loss or gradient raises
:class:`~metaopt.errors.NonFiniteError` naming the tensor and the step
(``nonfinite="raise"``, the default) or, with ``nonfinite="skip"``, returns parameters
and state untouched with a warning; tensors with zero elements are left alone (as
``torch.optim.Adam`` does); the first step past ``num_steps`` warns.

Architectures implement ``_update`` (the pure reference step, and the fused CPU
kernels when a ``backend`` is given) and may override ``_update_`` (the in-place step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.errors import NonFiniteError, StructureError
from metaopt.lopt.cpu_kernels import LoptCpuKernels, select_backend
from metaopt.lopt.torch_optimizer import LearnedOptimizerShell
from metaopt.optim.base import GradientTransformation
from metaopt.params import Params

__all__ = ["ARCHITECTURES", "NONFINITE", "LOptState", "LearnedOptimizer", "apply_step_",
           "register_architecture"]

LOptState = dict[str, Any]
#: What a step does with a non-finite loss or gradient.
NONFINITE = ("raise", "skip")


class LearnedOptimizer(nn.Module):
    """Base class: meta-parameters as module parameters, steps as pure functions."""

    #: Registry/architecture name written into native checkpoints (e.g. "small_fc_lopt").
    architecture: str = ""
    #: Whether ``update`` needs the training loss (VeLO's loss features do).
    needs_loss: bool = False

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments, enough to rebuild the architecture."""
        raise NotImplementedError

    def init(self, params: Params, num_steps: int) -> LOptState:
        """Optimizer state for task parameters ``params`` and a horizon of ``num_steps``."""
        raise NotImplementedError

    def derived_meta_parameters(self) -> dict[str, Tensor]:
        """Detached tensors derived from the meta-parameters that the ``torch.optim``
        shell may compute once and reuse for every in-place step (e.g. VeLO's folded LSTM
        weights); ``{}`` (the default) when there are none. The pure :meth:`update` never
        uses them, so it always reflects the meta-parameters it runs with."""
        return {}

    # ------------------------------------------------------------------ guarded steps
    def update(self, grads: Params, state: LOptState, params: Params,
               loss: Tensor | float | None = None, *,
               backend: str | LoptCpuKernels | None = None,
               nonfinite: str = "raise") -> tuple[Params, LOptState]:
        """One optimizer step: the new task parameters and the new state (pure).

        ``backend`` (see :func:`~metaopt.lopt.cpu_kernels.select_backend`; default the
        reference) may run tensors that need no autograd graph through the fused CPU
        kernels — same math, tested equal. ``nonfinite``: ``"raise"`` or ``"skip"``.
        """
        kern = select_backend(backend)
        checked = self._guard(grads, state, params, loss, nonfinite, kern)
        if checked is None:
            return dict(params), state
        active, loss_t = checked
        if len(active) == len(params):
            return self._update(grads, state, params, loss_t, kern)
        sub_params = {k: params[k] for k in active}
        new_sub, new_sub_state = self._update({k: grads[k] for k in active},
                                              _select(state, list(params), active),
                                              sub_params, loss_t, kern)
        new_params = {k: new_sub.get(k, p) for k, p in params.items()}
        return new_params, _refill(new_sub_state, state, list(params))

    def update_(self, grads: Params, state: LOptState, params: Params,
                loss: Tensor | float | None = None, *, lr: Mapping[str, float] | None = None,
                weight_decay: Mapping[str, float] | None = None,
                backend: LoptCpuKernels | None = None, workspace: dict | None = None,
                nonfinite: str = "raise") -> LOptState:
        """In-place step for the sole owner of ``state`` (the ``torch.optim`` shell).

        Writes ``p ← p + lr·(p_learned − p) − lr·wd·p`` into the tensors of ``params``
        (``lr``/``weight_decay`` per name, default 1 and 0) and returns the new state,
        which may reuse the old state's tensors: ``state`` is invalid afterwards. Same
        math and same guards as :meth:`update`. ``workspace`` is a dict the caller owns
        for prepared backend calls (kernel plans); it must come with the same ``state``.
        """
        checked = self._guard(grads, state, params, loss, nonfinite, backend)
        if checked is None:
            return state
        active, loss_t = checked
        lr, weight_decay = lr or {}, weight_decay or {}
        if len(active) == len(params):
            return self._update_(grads, state, params, loss_t, lr, weight_decay, backend,
                                 workspace)
        new_sub_state = self._update_({k: grads[k] for k in active},
                                      _select(state, list(params), active),
                                      {k: params[k] for k in active}, loss_t, lr,
                                      weight_decay, backend, workspace)
        return _refill(new_sub_state, state, list(params))

    def update_unchecked(self, grads: Params, state: LOptState, params: Params,
                         loss: Tensor | None = None) -> tuple[Params, LOptState]:
        """The pure reference step without :meth:`update`'s host-side guards.

        For callers that batch many task states under ``torch.func.vmap`` (where a
        data-dependent check cannot run) and guard the batch themselves — the truncated
        meta-training estimators flag and reset non-finite runs
        (:mod:`metaopt.bilevel.truncation`). Every tensor must be non-empty.
        """
        if loss is None and self.needs_loss:
            raise ValueError(f"learned optimizer '{self.architecture}' needs the training "
                             "loss")
        if loss is not None:
            loss = loss.reshape(()).to(torch.float32)
        return self._update(grads, state, params, loss, None)

    def _update(self, grads: Params, state: LOptState, params: Params, loss: Tensor | None,
                backend: LoptCpuKernels | None) -> tuple[Params, LOptState]:
        """The architecture's step on checked inputs (every tensor non-empty, finite)."""
        raise NotImplementedError

    def rows_supported(self, backend: LoptCpuKernels | None, params: Params,
                       state: LOptState) -> bool:
        """Whether :meth:`update_rows` has a fused path for these stacked rows (``R``
        tasks, row ``r`` of every leaf). None by default: callers then ``vmap``
        :meth:`update_unchecked`."""
        return False

    def update_rows(self, meta_rows: Params, grads: Params, state: LOptState,
                    params: Params, backend: LoptCpuKernels) -> tuple[Params, LOptState]:
        """``R`` independent steps, row ``r`` with row ``r`` of ``meta_rows``, through the
        fused backend (only where :meth:`rows_supported`); equal to ``vmap`` of
        :meth:`update_unchecked` over rows up to float rounding; the new state keeps
        ``state``'s key order (the same tree structure)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused batched-rows step")

    def _update_(self, grads: Params, state: LOptState, params: Params, loss: Tensor | None,
                 lr: Mapping[str, float], weight_decay: Mapping[str, float],
                 backend: LoptCpuKernels | None, workspace: dict | None) -> LOptState:
        """In-place step on checked inputs; default: the pure step, then copied in (an
        architecture that overrides :meth:`update` itself, not ``_update``, is called
        through it)."""
        if type(self).update is not LearnedOptimizer.update:
            new_params, new_state = self.update(grads, state, params, loss=loss)
        else:
            new_params, new_state = self._update(grads, state, params, loss, backend)
        for name, p in params.items():
            apply_step_(p, new_params[name], lr.get(name, 1.0), weight_decay.get(name, 0.0))
        return new_state

    def _guard(self, grads: Params, state: LOptState, params: Params,
               loss: Tensor | float | None, nonfinite: str,
               backend: LoptCpuKernels | None = None
               ) -> tuple[list[str], Tensor | None] | None:
        """Check a step's inputs before anything is written.

        Returns the names of the tensors to step (non-empty ones) and the loss as a 0-d
        float32 tensor, or ``None`` when the step is to be skipped (``nonfinite="skip"``).
        With the fused ``backend`` and contiguous float32 CPU gradients, their finiteness
        is checked in one C pass (:meth:`~metaopt.lopt.cpu_kernels.LoptCpuKernels.
        first_nonfinite`, the same answer as the per-tensor sums otherwise used).
        """
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if list(grads) != list(params):
            raise StructureError(f"grads keys {list(grads)} differ from params keys "
                                 f"{list(params)}")
        if loss is None and self.needs_loss:
            raise ValueError(f"learned optimizer '{self.architecture}' needs the training "
                             "loss: call update(..., loss=loss) (or opt.step(loss=loss) / "
                             "opt.step(closure))")
        device = next(iter(params.values())).device if params else torch.device("cpu")
        loss_t = None
        if loss is not None:
            loss_t = loss if isinstance(loss, Tensor) else torch.tensor(
                float(loss), dtype=torch.float32, device=device)
            if loss_t.numel() != 1:
                raise ValueError(f"learned optimizer '{self.architecture}': the loss must be "
                                 f"a scalar, got a tensor of shape {tuple(loss_t.shape)} "
                                 "(reduce it, e.g. loss.mean())")
            if loss_t.dim() or loss_t.dtype is not torch.float32:
                loss_t = loss_t.reshape(()).to(torch.float32)
        step = _as_int(state.get("iteration", 0))
        active = [k for k, p in params.items() if p.numel() > 0]
        active_grads = [grads[k].detach() for k in active]
        if backend is not None and all(g.dtype is torch.float32 and g.is_cpu
                                       and g.is_contiguous() for g in active_grads):
            finite = (backend.first_nonfinite(active_grads) < 0
                      and (loss_t is None or math.isfinite(float(loss_t))))
        else:
            checks = [g.sum() for g in active_grads]
            if loss_t is not None:
                checks.append(loss_t.detach())
            finite = not checks or bool(torch.isfinite(torch.stack(
                [c.to(device=device, dtype=torch.float32) for c in checks])).all())
        if not finite:
            bad = self._first_nonfinite(grads, active, loss_t)
            if bad is not None:
                msg = (f"learned optimizer '{self.architecture}': {bad} at step {step}; "
                       "no parameter or state was changed")
                if nonfinite == "raise":
                    raise NonFiniteError(msg)
                warnings.warn(f"{msg} (step skipped)", RuntimeWarning, stacklevel=3)
                return None
        num_steps = _as_int(state.get("num_steps", 0))
        if num_steps and step == num_steps:
            warnings.warn(f"learned optimizer '{self.architecture}' was set up for num_steps="
                          f"{num_steps} and is stepping past it; its time features saturate "
                          "(pass a larger num_steps to init / optimizer)", RuntimeWarning,
                          stacklevel=3)
        return active, loss_t

    @staticmethod
    def _first_nonfinite(grads: Params, names: Sequence[str], loss: Tensor | None
                         ) -> str | None:
        if loss is not None and not bool(torch.isfinite(loss)):
            return f"the loss is {float(loss)}"
        for k in names:
            g = grads[k].detach()
            if not bool(torch.isfinite(g).all()):
                n_bad = int((~torch.isfinite(g)).sum())
                return f"the gradient of '{k}' has {n_bad} non-finite value(s)"
        return None  # only the sum overflowed: every value is finite

    # ------------------------------------------------------------------ faces
    def optimizer(self, params: Any, num_steps: int, **kw: Any) -> LearnedOptimizerShell:
        """A ``torch.optim.Optimizer`` running this learned optimizer on ``params``
        (see :class:`~metaopt.lopt.torch_optimizer.LearnedOptimizerShell` for ``lr``,
        ``weight_decay``, ``backend``, ``nonfinite``)."""
        return LearnedOptimizerShell(params, self, num_steps=num_steps, **kw)

    def call(self, meta_params: Mapping[str, Tensor] | None, method: str, *args: Any,
             **kwargs: Any) -> Any:
        """``self.<method>(*args, **kwargs)`` with the meta-parameters replaced by
        ``meta_params`` (names as in ``named_parameters()``; missing ones keep the
        module's), through :func:`torch.func.functional_call`: the module itself is not
        changed, and gradients flow to ``meta_params``."""
        if method not in _CALLABLE:
            raise ValueError(f"call() runs one of {_CALLABLE}, not {method!r}")
        if meta_params is None:
            return getattr(self, method)(*args, **kwargs)
        return torch.func.functional_call(self, dict(meta_params), (method, *args), kwargs)

    def as_transformation(self, num_steps: int,
                          meta_params: Mapping[str, Tensor] | None = None, *,
                          backend: str | LoptCpuKernels | None = "reference",
                          nonfinite: str = "raise",
                          **init_kwargs: Any) -> GradientTransformation:
        """This learned optimizer as a :class:`~metaopt.optim.base.GradientTransformation`.

        ``update(grads, state, params[, loss=])`` returns *updates* ``new_params −
        params`` (and reads the loss when :attr:`needs_loss`), so the learned optimizer
        is the ``inner_optimizer`` of a :class:`~metaopt.bilevel.BilevelProblem` —
        differentiable in ``meta_params`` (e.g. ``dict(lopt.named_parameters())`` or a
        perturbation of it, for ES/PES) through every step. ``meta_params=None`` uses
        the module's own parameters. The backend is chosen here, once (default the
        reference; the kernels never run where an autograd graph is needed).
        ``init_kwargs`` go to :meth:`init` (e.g. μLO's ``mup_scales``).
        """
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        kern = select_backend(backend)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")

        def init(params: Params) -> LOptState:
            return self.call(meta_params, "init", params, int(num_steps), **init_kwargs)

        def update(grads: Params, state: LOptState, params: Params,
                   loss: Tensor | None = None) -> tuple[Params, LOptState]:
            new_params, new_state = self.call(meta_params, "update", grads, state, params,
                                              loss, backend=kern, nonfinite=nonfinite)
            return {k: new_params[k] - p for k, p in params.items()}, new_state

        return GradientTransformation(init, update, needs_loss=self.needs_loss)

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Dispatch for :meth:`call` (``functional_call`` runs ``forward``): ``"init"``
        or ``"update"``. A learned optimizer is not a layer; use its methods."""
        if method not in _CALLABLE:
            raise TypeError(f"{type(self).__name__} is used through init()/update(), "
                            "not called")
        return getattr(self, method)(*args, **kwargs)


#: Methods :meth:`LearnedOptimizer.call` may run with substituted meta-parameters.
_CALLABLE = ("init", "update", "update_unchecked")


def _as_int(value: Any) -> int:
    return int(value.item()) if isinstance(value, Tensor) else int(value)


def _per_tensor(tree: Any, names: Sequence[str]) -> bool:
    return isinstance(tree, Mapping) and bool(tree) and set(tree) == set(names)


def _select(tree: Any, names: Sequence[str], keep: Sequence[str]) -> Any:
    """``tree`` with every per-tensor dict (keyed exactly by ``names``) cut to ``keep``."""
    if _per_tensor(tree, names):
        return {k: tree[k] for k in keep}
    if isinstance(tree, Mapping):
        return {k: _select(v, names, keep) for k, v in tree.items()}
    return tree


def _refill(new: Any, old: Any, names: Sequence[str]) -> Any:
    """The new state of a partial step, with the untouched tensors' entries from ``old``."""
    if _per_tensor(old, names) and isinstance(new, Mapping):
        return {k: new[k] if k in new else old[k] for k in names}
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        return {k: _refill(v, old[k], names) if k in old else v for k, v in new.items()}
    return new


def apply_step_(p: Tensor, p_learned: Tensor, lr: float, weight_decay: float) -> None:
    """``p ← p + lr·(p_learned − p) − lr·weight_decay·p``, in place."""
    new_p = p_learned
    if lr != 1.0:
        new_p = p + lr * (new_p - p)
    if weight_decay:
        new_p = new_p - (lr * weight_decay) * p
    p.copy_(new_p)


#: Architecture name → class; native checkpoints and release importers look here.
ARCHITECTURES: dict[str, type[LearnedOptimizer]] = {}


def register_architecture(cls: type[LearnedOptimizer]) -> type[LearnedOptimizer]:
    """Class decorator: make ``cls`` loadable by its ``architecture`` name."""
    if not cls.architecture:
        raise ValueError(f"{cls.__name__} must set a non-empty `architecture` name")
    ARCHITECTURES[cls.architecture] = cls
    return cls
