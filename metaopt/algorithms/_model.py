"""A user's ``nn.Module`` as a pure function of a parameter dict, with buffers handled.

Normalisation layers are the one place where a plain ``functional_call`` would do
the wrong thing in meta-learning:

* **Training mode** (``model.train()``): BatchNorm-style layers normalise with the
  statistics of the batch they see — every support set and every query set of
  every task separately (as MAML, higher, learn2learn and TorchOpt do). Their
  running statistics are **not touched**: we pass ``None`` for the layer's
  ``running_mean``/``running_var``/``num_batches_tracked`` so the layer uses batch
  statistics and updates nothing. Without this, every inner step of every task would
  write into the shared running averages (and under ``vmap`` the in-place update is
  an error). Running stats therefore stay at whatever the user set; evaluate in
  training mode (transductive, as in the MAML paper) or fill them yourself.
* **Eval mode** (``model.eval()``): the running statistics are read, never written,
  so they are passed through unchanged.

Any other buffer is passed as the module's own tensor. A module that writes into
such a buffer in place still works in the per-task loop; under ``vmap`` it fails, so
``strategy="auto"`` keeps models with modules of the user's own classes on the loop
(see :mod:`metaopt.bilevel.task_batch`).

**Speed.** With ``trace=True`` (the default) the model runs as a verified
:mod:`torch.fx` trace of its forward wherever that is known to compute exactly what
``functional_call`` computes, bit for bit; everywhere else ``functional_call`` runs. The
rules (which models, which configurations, how a trace is verified) are in
:mod:`metaopt.algorithms._trace`. ``trace=False`` always uses ``functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from metaopt.algorithms import _trace
from metaopt.params import Params, functional_call

__all__ = ["NORM_LAYERS", "FunctionalModel"]

_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
          nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
          nn.LazyInstanceNorm1d, nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d)
"""torch.nn's layers with running statistics (the subclasses of its private ``_NormBase``)."""


class FunctionalModel:
    """``model`` as ``f(params, x)``; see the module docstring for buffer rules."""

    def __init__(self, model: nn.Module, rewrites: str | None = None, *,
                 trace: bool = True) -> None:
        """``trace``: run the model as its verified trace where possible
        (:mod:`~metaopt.algorithms._trace`; results bit-identical to ``functional_call``);
        ``rewrites``: the trace's rewrite level, ``"exact"`` (None: the default) or
        ``"none"`` (:data:`~metaopt.algorithms._trace.REWRITES`)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(trace, bool):
            raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
        self.model = model
        self.norm_modules = [(prefix, mod) for prefix, mod in model.named_modules()
                             if isinstance(mod, NORM_LAYERS)]
        self.param_names = [n for n, _ in model.named_parameters()]
        if not self.param_names:
            raise ValueError(f"{type(model).__name__} has no parameters to meta-learn")
        self.rewrites = _trace.rewrite_level(rewrites)
        self.trace = trace
        self._configuration = _trace.Configuration(model)
        # Where each buffer lives, found once (a walk over the modules per call costs
        # more than the forward of a small MLP); its current tensor is read per call.
        self._buffer_slots = []
        for name, _ in model.named_buffers():
            owner, _, attr = name.rpartition(".")
            self._buffer_slots.append((name, model.get_submodule(owner), attr))
        # Per configuration (see _trace.Configuration): the trace, or None where tracing
        # raised Untraceable/TraceError; ``_verified``: the trace's tensor names and function
        # for the configurations where it passed verification; ``_untraced``: those
        # decided for functional_call (tracing raised, or verification failed).
        self._traces: dict[tuple, _trace.TracedForward | None] = {}
        self._verified: dict[tuple, tuple[list[str], Callable[..., object]]] = {}
        self._untraced: set[tuple] = set()

    def buffers(self) -> dict[str, Tensor | None]:
        """The buffers to call the model with, following the rules above.

        Each normalisation layer's own ``training`` flag decides (so a model with a
        frozen, eval-mode BatchNorm inside a training model is respected).
        """
        bufs: dict[str, Tensor | None] = {
            name: getattr(mod, attr) for name, mod, attr in self._buffer_slots}
        for prefix, mod in self.norm_modules:
            if mod.training:
                for b in _NORM_BUFFERS:
                    bufs[f"{prefix}.{b}" if prefix else b] = None
        return bufs

    def parameters(self) -> Params:
        """The model's live parameters (autograd leaves, by name)."""
        return dict(self.model.named_parameters())

    def traced(self) -> bool | None:
        """Whether calls in the model's current configuration run the trace: True or
        False once decided, None while not yet (no call in this configuration so far)."""
        mode = self._configuration() if self.trace else None
        if mode is None or mode in self._untraced:
            return False
        return True if mode in self._verified else None

    def __call__(self, params: Mapping[str, Tensor], x: Tensor,
                 buffers: Mapping[str, Tensor | None] | None = None) -> Tensor:
        """The model's output for ``params`` (parameters by name; missing ones are the
        module's own) on input ``x``, with ``buffers`` (default: :meth:`buffers`)."""
        mode = self._configuration() if self.trace else None
        if mode is None:
            return self._functional_call(params, x, buffers)
        verified = self._verified.get(mode)
        if verified is None and mode not in self._untraced:
            verified = self._decide(mode, x)
        if verified is None:
            return self._functional_call(params, x, buffers)
        names, run = verified
        if buffers is None and any(n not in params for n in names):
            buffers = self.buffers()
        args = [params[n] if n in params else buffers.get(n) for n in names]
        if any(a is None for a in args):  # a tensor the trace reads is not given
            return self._functional_call(params, x, buffers)
        return run(*args, x)

    def _functional_call(self, params: Mapping[str, Tensor], x: Tensor,
                         buffers: Mapping[str, Tensor | None] | None) -> Tensor:
        return functional_call(self.model, params, (x,),
                               buffers=self.buffers() if buffers is None else buffers,
                               strict=False)

    def _decide(self, mode: tuple, x: Tensor) -> tuple[list[str], Callable[..., object]] | None:
        """First call in ``mode``: trace the model (once), keep the trace only if it is
        bit-identical to ``functional_call`` on the probe input (``_trace.verify``)."""
        if mode not in self._traces:
            try:
                self._traces[mode] = _trace.TracedForward(self.model, self.rewrites)
            except (_trace.Untraceable, _trace.TraceError):
                self._traces[mode] = None
        trace, verified = self._traces[mode], None
        if trace is not None:
            own = {**self.buffers(), **self.parameters()}
            tensors = [own.get(n) for n in trace.names]
            if all(t is not None for t in tensors) and _trace.verify(
                    trace.fn, lambda probe: self._functional_call({}, probe, None),
                    tensors, x):
                verified = self._verified[mode] = (trace.names, trace.fn)
        if verified is None:
            self._untraced.add(mode)
        return verified
