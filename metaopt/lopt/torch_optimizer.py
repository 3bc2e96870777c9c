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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from metaopt.lopt.base import LearnedOptimizer

__all__ = ["LearnedOptimizerShell", "MissingLossError", "learned_torch_optimizer"]

#: Marks, inside the global state tree, where a per-tensor dict was taken out.
PER_TENSOR = "__per_tensor__"
_EXTRA_KEY = "learned_optimizer"


class MissingLossError(ValueError):
    """``step()`` was called without a loss for an architecture that needs one."""


def _split(tree: Any, names: set[str], path: tuple[str, ...] = ()
           ) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Separate per-tensor dicts (keyed exactly by ``names``) from the global tree."""
    per_tensor: dict[str, dict[str, Any]] = {}
    if isinstance(tree, Mapping):
        if tree and set(tree) == names:
            key = "/".join(path)
            for name, value in tree.items():
                per_tensor.setdefault(name, {})[key] = value
            return PER_TENSOR, per_tensor
        out = {}
        for k, v in tree.items():
            sub, found = _split(v, names, (*path, str(k)))
            out[k] = sub
            for name, entries in found.items():
                per_tensor.setdefault(name, {}).update(entries)
        return out, per_tensor
    return tree, per_tensor


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
    if isinstance(tree, Tensor):
        return tree.detach().to(device, copy=True)
    if isinstance(tree, Mapping):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to_device(v, device) for v in tree)
    return tree


class LearnedOptimizerShell(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` driving a :class:`LearnedOptimizer` in place.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        lopt: the learned optimizer (its meta-parameters are used, never changed).
        num_steps: planned length of training; learned optimizers condition on it.
        lr: default step multiplier of the learned update (1.0 = as meta-trained).
        weight_decay: default decoupled weight decay (fraction of ``p`` per step × lr).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 lopt: LearnedOptimizer, num_steps: int, *, lr: float = 1.0,
                 weight_decay: float = 0.0) -> None:
        if not isinstance(lopt, LearnedOptimizer):
            raise TypeError(f"lopt must be a LearnedOptimizer, got {type(lopt).__name__}")
        if int(num_steps) <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        if lr < 0 or weight_decay < 0:
            raise ValueError("lr and weight_decay must be non-negative")
        self.lopt = lopt
        self.num_steps = int(num_steps)
        self._global: Any = None  # global part of the learned optimizer's state
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

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
        state = self.lopt.init({n: p.detach() for n, p in fresh}, self.num_steps)
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
                                      weight_decay=wds)

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
        if extra is None:
            self._global = None
            return
        self.num_steps = int(extra["num_steps"])
        params = [p for _, p, _ in self._named_params()]
        device = params[0].device if params else torch.device("cpu")
        self._global = _to_device(extra["global_state"], device)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(lopt=self.lopt, num_steps=self.num_steps, _global=self._global)
        return state

    def __repr__(self) -> str:
        return (f"LearnedOptimizerShell({self.lopt.architecture}, num_steps={self.num_steps}, "
                f"groups={len(self.param_groups)})")


def learned_torch_optimizer(lopt: LearnedOptimizer, params: Iterable[Any], num_steps: int,
                            **kwargs: Any) -> LearnedOptimizerShell:
    """``lopt.optimizer(params, num_steps, ...)`` as a function: the torch optimizer shell."""
    return LearnedOptimizerShell(params, lopt, num_steps=num_steps, **kwargs)
