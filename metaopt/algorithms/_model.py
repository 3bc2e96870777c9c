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
such a buffer in place still works in the per-task loop; under ``vmap`` it fails,
and the algorithms then fall back to the loop (see ``_execution``).

**Speed.** ``torch.func.functional_call`` swaps every parameter into the module and
back on each call — about a quarter of a millisecond for a 3-layer MLP on our CPUs,
a third of the per-task cost of second-order MAML on the benchmark MLP (the meta-batch
loop calls the model K + 1 times per task). So the module's forward is also traced
once with :mod:`torch.fx` into straight-line code that takes the parameters as
arguments (:class:`_TracedForward`), and that code is used whenever it is known to
compute exactly what ``functional_call`` computes: the trace succeeded, no module has
hooks or parametrizations, the graph writes into no tensor in place, every tensor it
reads is given (no ``None`` buffer), and on its first call outside ``torch.func``
transforms its output was bit-identical to ``functional_call``'s. Only models built
entirely from ``torch.nn``'s own modules (``nn.Sequential`` of ``Linear``, ``Conv2d``,
``ReLU``, …) are traced: a user's own ``forward`` may have Python side effects that a
trace would perform once, at trace time. A trace freezes the Python values the
forward read (``training`` flags, a dropout rate, a stride), so it is kept per
*configuration* — the modules' plain attributes and whether anything hooks into
them, read on each call (a few µs) — and a changed configuration is traced and
verified anew. Otherwise — and for every call in a configuration not yet verified —
``functional_call`` runs, so the trace is purely an optimisation. ``torch.nn``'s
BatchNorm layers are recorded as the ``F.batch_norm`` call their forward makes (their
Python rank check defeats symbolic tracing); in training mode that is the call without
running statistics, as ``functional_call`` makes it with the ``None`` buffers above.

**Rewrites.** The trace is also rewritten for speed (:mod:`~metaopt.algorithms._rewrites`:
max-pool before ReLU, exact; thin CPU float32 convolutions as an im2col GEMM with a
channels-last result, equal up to float rounding). The rewritten trace is used only if,
on the same first call, the plain trace was bit-identical to ``functional_call`` and the
rewritten one is within ``_rewrites.VERIFY_REL_TOL`` of it; if it ever raises later,
the plain trace takes over. By default only the exact rule runs (results stay
bit-identical to ``functional_call``); ``rewrites="all"`` (or ``METAOPT_GRAPH_REWRITES=all``
when the ``FunctionalModel`` is built) adds the GEMM convolutions, ``"none"`` neither.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from metaopt.algorithms import _rewrites
from metaopt.params import Params

__all__ = ["FunctionalModel"]

_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Root(nn.Module):
    """Holds the user's module while tracing, so fx's constants land here, not on it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> object:  # the algorithms call models with one input
        return self.m(x)


class _FlatTracer(torch.fx.Tracer):
    """Traces through every submodule down to ``torch`` functions (no leaf modules);
    buffers are proxies, so what the forward does with them is recorded, not run.

    ``torch.nn``'s BatchNorm layers are the exception: their forward checks the input's
    rank in Python (``if input.dim() != 4: raise``), which symbolic tracing cannot
    follow, so they are recorded as :func:`_check_rank` and ``F.batch_norm`` calls with
    the arguments their forward would pass (:func:`_batch_norm_call`).
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False

    def call_module(self, m: nn.Module, forward: Callable[..., object],
                    args: tuple, kwargs: dict) -> object:
        if type(m) in _BATCH_NORM_RANKS and len(args) == 1 and not kwargs:
            return _batch_norm_call(self, m, args[0])
        return super().call_module(m, forward, args, kwargs)


_BATCH_NORM_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _check_rank(x: Tensor, ranks: tuple[int, ...], expected: str) -> Tensor:
    """``x``, after the rank check of a BatchNorm layer's forward (same error)."""
    if x.dim() not in ranks:
        raise ValueError(f"expected {expected} input (got {x.dim()}D input)")
    return x


def _batch_norm_call(tracer: _FlatTracer, m: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record what ``_BatchNorm.forward`` computes (torch 2.x) for the module's current
    settings: ``F.batch_norm`` with the batch-statistics flag and buffers it would pass.

    In training mode with tracked running statistics the forward would write into them;
    :class:`FunctionalModel` passes ``None`` for those buffers there (batch statistics,
    nothing updated — see the module docstring), so the trace records exactly that call:
    ``F.batch_norm`` without running statistics. The first call's bit-for-bit check
    against ``functional_call`` guards the rest.
    """
    path = tracer.path_of_module(m)
    untracked = m.training and m.track_running_stats  # buffers passed as None

    def tensor(name: str) -> Tensor | None:  # not getattr: the tracer records those reads
        return m._parameters.get(name, m._buffers.get(name))

    def attr(name: str) -> torch.fx.Proxy | None:
        if (untracked and name in _NORM_BUFFERS) or tensor(name) is None:
            return None
        return tracer.create_proxy("get_attr", f"{path}.{name}", (), {})

    ranks = _BATCH_NORM_RANKS[type(m)]
    expected = "2D or 3D" if len(ranks) == 2 else f"{ranks[0]}D"
    x = tracer.create_proxy("call_function", _check_rank, (x, ranks, expected), {})
    bn_training = m.training or (tensor("running_mean") is None
                                 and tensor("running_var") is None)
    momentum = 0.0 if m.momentum is None else m.momentum
    return tracer.create_proxy(
        "call_function", F.batch_norm,
        (x, attr("running_mean"), attr("running_var"), attr("weight"), attr("bias"),
         bn_training, momentum, m.eps), {})


class _TracedForward:
    """``model.forward`` as generated code ``fn(*tensors, x)`` over the tensors it reads.

    ``names`` are the parameter/buffer names (as in ``named_parameters()`` /
    ``named_buffers()``; a tied alias maps to the name that ``named_parameters()``
    keeps) whose values are passed, in order. ``fast`` is the same function after the
    speed rewrites of :mod:`~metaopt.algorithms._rewrites` (None when ``rewrites`` is
    off or no rule applies). Raises if the model cannot be traced or the trace would
    not be a pure function of those tensors.
    """

    def __init__(self, model: nn.Module, rewrites: str = "all") -> None:
        canonical = {id(t): n for n, t in model.named_parameters()}
        canonical.update({id(t): n for n, t in model.named_buffers()})
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        root = _Root(model)
        graph = _FlatTracer().trace(root)
        flat = torch.fx.Graph()
        slots: dict[str, torch.fx.Node] = {}
        self.names: list[str] = []
        for node in graph.nodes:  # the tensors first, then the input
            if node.op == "get_attr":
                if node.target[2:] not in tensors:  # a plain tensor attribute: its value
                    raise TypeError(f"'{node.target[2:]}' is neither a parameter nor a "
                                    f"buffer")  # at call time is not ours to pass
                name = canonical[id(tensors[node.target[2:]])]
                if name not in slots:
                    slots[name] = flat.placeholder(f"t{len(self.names)}")
                    self.names.append(name)
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                env[node] = slots[canonical[id(tensors[node.target[2:]])]]
            elif node.op == "call_module":
                raise TypeError(f"module '{node.target}' was not traced through")
            else:
                if node.op in ("call_function", "call_method") and _in_place(node):
                    raise TypeError(f"'{node.target}' writes into a tensor in place")
                env[node] = flat.node_copy(node, env.__getitem__)
        self.fn: Callable[..., object] = torch.fx.GraphModule(root, flat).forward
        rewritten = _rewrites.rewrite(flat, rewrites)
        self.fast: Callable[..., object] | None = (
            None if rewritten is None else torch.fx.GraphModule(root, rewritten).forward)


def _in_place(node: torch.fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True


_PLAIN = (bool, int, float, str, tuple, type(None))


def _is_torch_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn.")


class _Configuration:
    """What a trace of ``model`` bakes in, read cheaply on every call.

    Only models built entirely from ``torch.nn``'s own modules are traced: their
    forwards are known to have no Python side effects (a user's ``forward`` could
    count calls or append to a list, which a trace would do once, at trace time).
    For those, the Python values a forward reads are the modules' plain public
    attributes (``training``, ``p``, ``stride``, …); their names are found once, their
    values read per call. Hooks (per module or global) and parametrizations make
    ``__call__`` do more than ``forward``, so they turn tracing off while present.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.traceable = all(_is_torch_module(m) for m in self.modules)
        self.getters = [operator.attrgetter(*[k for k, v in m.__dict__.items()
                                              if k[0] != "_" and isinstance(v, _PLAIN)])
                        for m in self.modules]  # "training" is always among them

    def __call__(self) -> tuple | None:
        """The current configuration, or None if nothing may be traced now."""
        if not self.traceable or _global_hooks():
            return None
        key = []
        for m, get in zip(self.modules, self.getters):
            if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks or "parametrizations" in m._modules):
                return None
            try:
                key.append(get(m))
            except AttributeError:  # an attribute was deleted since: do not trace
                return None
        return tuple(key)


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks
                or module._global_backward_hooks)


class FunctionalModel:
    """``model`` as ``f(params, x)``; see the module docstring for buffer rules."""

    def __init__(self, model: nn.Module, rewrites: str | bool | None = None) -> None:
        """``rewrites``: the level of speed rewrites of the trace
        (:mod:`~metaopt.algorithms._rewrites`: ``"none"``, ``"exact"`` — bit-identical
        results, the default unless ``METAOPT_GRAPH_REWRITES`` says otherwise — or
        ``"all"``; ``True``/``False`` mean ``"all"``/``"none"``)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.norm_modules = [(prefix, mod) for prefix, mod in model.named_modules()
                             if isinstance(mod, _NormBase)]
        self.param_names = [n for n, _ in model.named_parameters()]
        if not self.param_names:
            raise ValueError(f"{type(model).__name__} has no parameters to meta-learn")
        self._configuration = _Configuration(model)
        self.rewrites = _rewrites.level(rewrites)
        # Where each buffer lives, found once (a walk over the modules per call costs
        # more than the forward of a small MLP); its current tensor is read per call.
        self._buffer_slots = []
        for name, _ in model.named_buffers():
            owner, _, attr = name.rpartition(".")
            self._buffer_slots.append((name, model.get_submodule(owner), attr))
        # Per configuration (see _Configuration): the trace, or None where it cannot be
        # used; ``_verified``: for the configurations whose trace matched
        # functional_call, the function to run (the trace, or its verified rewrite).
        self._traces: dict[tuple, _TracedForward | None] = {}
        self._verified: dict[tuple, Callable[..., object]] = {}

    def buffers(self) -> dict[str, Tensor | None]:
        """The buffers to call the model with, following the rules above.

        Each normalisation layer's own ``training`` flag decides (so a model with a
        frozen, eval-mode BatchNorm inside a training model is respected).
        """
        bufs: dict[str, Tensor | None] = {
            name: mod._buffers.get(attr) for name, mod, attr in self._buffer_slots}
        for prefix, mod in self.norm_modules:
            if mod.training:
                for b in _NORM_BUFFERS:
                    bufs[f"{prefix}.{b}" if prefix else b] = None
        return bufs

    def parameters(self) -> Params:
        """The model's live parameters (autograd leaves, by name)."""
        return dict(self.model.named_parameters())

    def __call__(self, params: Mapping[str, Tensor], x: Tensor,
                 buffers: Mapping[str, Tensor | None] | None = None) -> Tensor:
        mode = self._configuration()
        try:
            trace = self._traces[mode] if mode is not None else None
        except KeyError:
            trace = self._traces[mode] = self._trace()
        except TypeError:  # an unhashable attribute value: do not trace
            trace = None
        if trace is None:
            return self._functional_call(params, x, buffers)
        if buffers is None and any(n not in params for n in trace.names):
            buffers = self.buffers()
        args = [params[n] if n in params else buffers.get(n) for n in trace.names]
        if any(a is None for a in args):
            return self._functional_call(params, x, buffers)
        run = self._verified.get(mode)
        if run is not None:
            return run(*args, x)
        return self._verify(mode, trace, args, params, x, buffers)

    def _functional_call(self, params: Mapping[str, Tensor], x: Tensor,
                         buffers: Mapping[str, Tensor | None] | None) -> Tensor:
        tensors = dict(self.buffers() if buffers is None else buffers)
        tensors.update(params)
        return torch.func.functional_call(self.model, tensors, (x,), strict=False)

    def _trace(self) -> _TracedForward | None:
        try:
            return _TracedForward(self.model, rewrites=self.rewrites)
        except Exception:  # dynamic control flow, in-place writes, …: functional_call
            return None

    def _verify(self, mode: tuple, trace: _TracedForward, args: list[Tensor],
                params: Mapping[str, Tensor], x: Tensor,
                buffers: Mapping[str, Tensor | None] | None) -> Tensor:
        """First call in ``mode``: keep the trace only if it reproduces functional_call.

        The trace runs first under a forked RNG, so random ops (dropout) draw the same
        numbers in both and ``functional_call``'s result, returned, is the one the RNG
        stream sees. The rewritten trace (``trace.fast``), if any, is then run the same
        way and kept if it matches within the tolerance of
        :func:`~metaopt.algorithms._rewrites.close_enough`; otherwise the plain trace runs.
        """
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return self._functional_call(params, x, buffers)  # no values to compare here
        got = self._run_detached(trace.fn, args, x)
        expected = self._functional_call(params, x, buffers)
        same = (isinstance(got, Tensor) and isinstance(expected, Tensor)
                and got.shape == expected.shape and got.dtype == expected.dtype
                and bool(torch.equal(got, expected.detach())))
        if not same:
            self._traces[mode] = None
            return expected
        run = trace.fn
        if trace.fast is not None and _rewrites.close_enough(
                self._run_detached(trace.fast, args, x), expected):
            run = _fall_back_on_error(trace.fast, trace.fn,
                                      lambda: self._verified.__setitem__(mode, trace.fn))
        self._verified[mode] = run
        return expected

    @staticmethod
    def _run_detached(fn: Callable[..., object], args: list[Tensor], x: Tensor) -> object:
        """``fn``'s output without autograd under a forked RNG; None if it raised."""
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                return fn(*[a.detach() for a in args], x)
        except Exception:
            return None


def _fall_back_on_error(fast: Callable[..., object], plain: Callable[..., object],
                        give_up: Callable[[], None]) -> Callable[..., object]:
    """``fast``, except that if it raises a ``RuntimeError``, ``give_up()`` is called and
    ``plain`` runs.

    A rewritten trace is verified on one input; a later input may take a path it did not
    (e.g. a ``.view`` that channels-last strides do not allow). ``plain`` computes the
    same function, so its result — or its own error — is the answer.
    """

    def run(*args: object) -> object:
        try:
            return fast(*args)
        except RuntimeError:  # what aten raises for layouts; a user's ValueError passes
            give_up()
            return plain(*args)

    return run
