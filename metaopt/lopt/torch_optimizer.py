"""The ``torch.optim.Optimizer`` face of any learned optimizer (one shell for all).

    lopt = load_checkpoint("small_fc_lopt" or a path)
    opt = lopt.optimizer(model.parameters(), num_steps=10_000)
    loss.backward(); opt.step(loss=loss)      # or opt.step(closure)

The shell owns no math: each ``step`` gathers every parameter that has a gradient (all
param groups together, so architectures that couple tensors — VeLO's max-pool over
tensors — see the whole model) and calls the architecture's in-place
``update_(grads, state, params, loss, lr=..., weight_decay=...)`` once: the same math as
the pure ``update``, written straight into the parameters and (where the architecture
can) into the old state's buffers, since the shell is the state's only owner.

Param groups accept:

* ``lr`` (default 1.0) — a multiplier on the learned step: ``p + lr * (p_lopt - p)``, so
  LR schedulers scale the learned update (lr 1.0 is exactly the learned optimizer);
* ``weight_decay`` (default 0.0) — decoupled: ``p -= lr * weight_decay * p`` per step.

State layout. Parameters are named ``"0"``, ``"1"``, … in ``param_groups`` order (the
indices ``state_dict`` uses). Architectures must keep per-tensor state in dicts keyed by
those names (e.g. ``state["m"]["3"]``); the shell stores those entries in
``self.state[param]`` under their path (``"m"``, ``"fac/v_row"``), where torch moves and
casts them with the parameter, and everything else (step counters, loss buffers, …) in
a global tree. ``state_dict()`` adds that tree under ``"learned_optimizer"``;
``load_state_dict`` restores it onto the parameters' device. Architectures must not
rely on the order or spelling of parameter names.

Meta-parameters are constants while the shell holds them. At construction (and in
``load_state_dict`` and :meth:`LearnedOptimizerShell.refresh_meta_parameters`) the shell
takes a detached snapshot of what the step's networks need
(``lopt.derived_meta_parameters()``, e.g. VeLO's folded LSTM weights) into its
workspace; an in-place change of ``lopt``'s weights, or moving ``lopt`` to another
device, reaches the shell's steps only after ``refresh_meta_parameters()``. The pure
``lopt.update`` / ``as_transformation`` / ``lopt.call(meta_params, ...)`` never cache
anything: they always run on the meta-parameters they are given (as ES/PES need).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from metaopt.lopt.cpu_kernels import LoptCpuKernels, select_backend
from metaopt.tree import tree_map_nested

__all__ = ["LearnedOptimizerShell", "MissingLossError", "learned_torch_optimizer"]

#: Marks, inside the global state tree, where a per-tensor dict was taken out.
PER_TENSOR = "__per_tensor__"
_EXTRA_KEY = "learned_optimizer"


class MissingLossError(ValueError):
    """``step()`` was called without a loss for an architecture that needs one."""


class _Steppable(Protocol):
    """What the shell needs of a learned optimizer (:class:`~metaopt.lopt.base.
    LearnedOptimizer`; a protocol, so this module does not import the base class)."""

    architecture: str
    needs_loss: bool

    def init(self, params: dict[str, Tensor], num_steps: int) -> Any: ...

    def update_(self, grads: dict[str, Tensor], state: Any, params: dict[str, Tensor],
                loss: Tensor | None = None, **kwargs: Any) -> Any: ...


def _split(tree: Any, names: set[str], path: tuple[str, ...] = ()
           ) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Separate per-tensor dicts (keyed exactly by ``names``) from the global tree."""
    per_tensor: dict[str, dict[str, Any]] = {}
    return _split_into(tree, names, path, per_tensor), per_tensor


def _split_into(tree: Any, names: set[str], path: tuple[str, ...],
                per_tensor: dict[str, dict[str, Any]]) -> Any:
    """:func:`_split`'s walk, writing the per-tensor entries into ``per_tensor``."""
    if not isinstance(tree, Mapping):
        return tree
    if tree and len(tree) == len(names) and tree.keys() == names:
        key = "/".join(path)
        for name, value in tree.items():
            entries = per_tensor.get(name)
            if entries is None:
                entries = per_tensor[name] = {}
            entries[key] = value
        return PER_TENSOR
    return {k: _split_into(v, names, (*path, str(k)), per_tensor) for k, v in tree.items()}


def _merge(tree: Any, per_tensor: Mapping[str, Mapping[str, Any]],
           path: tuple[str, ...] = ()) -> Any:
    """Inverse of :func:`_split` for the names in ``per_tensor`` (in their order)."""
    if isinstance(tree, str) and tree == PER_TENSOR:
        key = "/".join(path)
        return {name: entries[key] for name, entries in per_tensor.items()}
    if isinstance(tree, Mapping):
        return {k: _merge(v, per_tensor, (*path, str(k))) for k, v in tree.items()}
    return tree


def _to_device(tree: Any, device: torch.device) -> Any:
    return tree_map_nested(lambda t: t.detach().to(device, copy=True), tree)


class LearnedOptimizerShell(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` driving a :class:`LearnedOptimizer` in place.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        lopt: the learned optimizer (its meta-parameters are used, never changed).
        num_steps: planned length of training; learned optimizers condition on it.
        lr: default step multiplier of the learned update (1.0 = as meta-trained).
        weight_decay: default decoupled weight decay (fraction of ``p`` per step × lr).
        backend: ``"auto"`` (default: the fused CPU kernels for float32 CPU tensors when
            a C compiler is available), ``"cpu_kernels"`` or ``"reference"`` — chosen
            once, here (:func:`~metaopt.lopt.cpu_kernels.select_backend`).
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose loss or gradients are
            not finite; either way nothing is written first.
        init_kwargs: extra arguments of ``lopt.init`` (e.g. μLO's ``mup_scales``, keyed
            by the shell's parameter names ``"0"``, ``"1"``, …).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 lopt: _Steppable, num_steps: int, *, lr: float = 1.0,
                 weight_decay: float = 0.0, backend: str | LoptCpuKernels | None = "auto",
                 nonfinite: str = "raise", init_kwargs: Mapping[str, Any] | None = None
                 ) -> None:
        if not (hasattr(lopt, "init") and hasattr(lopt, "update_")
                and hasattr(lopt, "architecture")):
            raise TypeError(f"lopt must be a LearnedOptimizer, got {type(lopt).__name__}")
        if int(num_steps) <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        if lr < 0 or weight_decay < 0:
            raise ValueError("lr and weight_decay must be non-negative")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.lopt = lopt
        self.num_steps = int(num_steps)
        self.backend = select_backend(backend)
        self.nonfinite = nonfinite
        self.init_kwargs = dict(init_kwargs or {})
        self._global: Any = None  # global part of the learned optimizer's state
        #: prepared backend calls (kernel plans) for this shell's state and the snapshot
        #: of the meta-parameters (``"meta"``); reset with the state
        self._workspace: dict[str, Any] = {}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.refresh_meta_parameters()

    def refresh_meta_parameters(self) -> None:
        """Take a new snapshot of the learned optimizer's meta-parameters.

        The shell treats them as constants: call this after changing ``lopt``'s weights in
        place (e.g. a meta-training step) or moving it, to make later steps use them.
        """
        derive = getattr(self.lopt, "derived_meta_parameters", None)
        self._workspace["meta"] = derive() if derive is not None else {}

    # ------------------------------------------------------------------ helpers
    def _named_params(self) -> list[tuple[str, Tensor, dict[str, Any]]]:
        out, i = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((str(i), p, group))
                i += 1
        return out

    def _initialise(self, named: list[tuple[str, Tensor, dict[str, Any]]]) -> None:
        """Create state for parameters that have none (all of them on the first step)."""
        fresh = [(n, p) for n, p, _ in named if not self.state[p]]
        if not fresh:
            return
        kwargs = self.init_kwargs
        if "mup_scales" in kwargs:
            kwargs = {**kwargs, "mup_scales": {n: kwargs["mup_scales"][n] for n, _ in fresh
                                               if n in kwargs["mup_scales"]}}
        state = self.lopt.init({n: p.detach() for n, p in fresh}, self.num_steps, **kwargs)
        global_tree, per_tensor = _split(state, {n for n, _ in fresh})
        if self._global is None:
            self._global = global_tree
        for n, p in fresh:
            self.state[p].update(per_tensor.get(n, {}))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             loss: Tensor | float | None = None) -> Any:
        """One learned-optimizer step on every parameter that has a gradient.

        ``loss`` (or the value ``closure()`` returns) is fed to architectures that use
        it (``lopt.needs_loss``, e.g. VeLO); a missing loss is then an error.
        Returns the closure's loss (or ``loss``).
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if loss is None:
                loss = result
        if loss is None and self.lopt.needs_loss:
            raise MissingLossError(
                f"learned optimizer '{self.lopt.architecture}' needs the training loss: "
                "call opt.step(loss=loss) or opt.step(closure)")
        named = [(n, p, g) for n, p, g in self._named_params() if p.grad is not None]
        if not named:
            return result if result is not None else loss
        for _, p, _ in named:
            if p.grad.is_sparse:
                raise RuntimeError("learned optimizers do not support sparse gradients")
        self._initialise(self._named_params())

        names = [n for n, _, _ in named]
        per_tensor = {n: self.state[p] for n, p, _ in named}
        state = _merge(self._global, per_tensor)
        params = {n: p.detach() for n, p, _ in named}
        grads = {n: p.grad.detach() for n, p, _ in named}
        loss_t = None
        if loss is not None:
            loss_t = (loss.detach() if isinstance(loss, Tensor)
                      else torch.tensor(float(loss), dtype=torch.float32))
        lrs = {n: group["lr"] for n, _, group in named}
        wds = {n: group["weight_decay"] for n, _, group in named}
        new_state = self.lopt.update_(grads, state, params, loss=loss_t, lr=lrs,
                                      weight_decay=wds, backend=self.backend,
                                      workspace=self._workspace, nonfinite=self.nonfinite)

        new_global, new_per_tensor = _split(new_state, set(names))
        self._global = new_global
        for n, p, _ in named:
            self.state[p].update(new_per_tensor.get(n, {}))
        return result if result is not None else loss

    # ------------------------------------------------------------------ (de)serialise
    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict plus the global learned-optimizer state and horizon."""
        sd = super().state_dict()
        sd[_EXTRA_KEY] = {"architecture": self.lopt.architecture,
                          "num_steps": self.num_steps,
                          "global_state": self._global}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (per-tensor state follows each parameter)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_EXTRA_KEY, None)
        if extra is not None and extra.get("architecture") != self.lopt.architecture:
            raise ValueError(
                f"state dict is for learned optimizer '{extra.get('architecture')}', "
                f"this optimizer runs '{self.lopt.architecture}'")
        super().load_state_dict(state_dict)
        self._workspace = {}
        self.refresh_meta_parameters()
        if extra is None:
            self._global = None
            return
        self.num_steps = int(extra["num_steps"])
        params = [p for _, p, _ in self._named_params()]
        device = params[0].device if params else torch.device("cpu")
        self._global = _to_device(extra["global_state"], device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "meta" not in self.__dict__.get("_workspace", {}):
            self._workspace = {}
            self.refresh_meta_parameters()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(lopt=self.lopt, num_steps=self.num_steps, _global=self._global,
                     backend=self.backend, nonfinite=self.nonfinite,
                     init_kwargs=self.init_kwargs, _workspace={})
        return state

    def __repr__(self) -> str:
        return (f"LearnedOptimizerShell({self.lopt.architecture}, num_steps={self.num_steps}, "
                f"groups={len(self.param_groups)})")


def learned_torch_optimizer(lopt: _Steppable, params: Iterable[Any], num_steps: int,
                            **kwargs: Any) -> LearnedOptimizerShell:
    """``lopt.optimizer(params, num_steps, ...)`` as a function: the torch optimizer shell."""
    return LearnedOptimizerShell(params, lopt, num_steps=num_steps, **kwargs)
