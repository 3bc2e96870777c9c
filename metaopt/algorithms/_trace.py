"""The traced forward: an explicit accelerator of ``FunctionalModel`` (``_model.py``).

``torch.func.functional_call`` swaps every parameter into the module and back on each
call — about a quarter of a millisecond for the 3-layer sinusoid MLP, a large share of
second-order MAML's per-task cost there (the model runs K + 1 times per task). This
module traces the model's forward once with :mod:`torch.fx` into straight-line code
``fn(*tensors, x)`` that takes the parameters and buffers as arguments, so a call costs
only its kernels. It is used by ``FunctionalModel(model, trace=True)`` (the default) and
only where it computes exactly what ``functional_call`` computes:

* **Which models** (decided at construction, :func:`traceable`): those built only from
  the ``torch.nn`` module types of :data:`TRACEABLE` (``Sequential`` of ``Linear``,
  ``Conv2d``, ``BatchNorm2d``, ``ReLU``, ``MaxPool2d``, …; each is traced bit-for-bit in
  the tests). A user's own ``forward`` may have Python side effects that a trace would
  perform once, at trace time, so such a model always uses ``functional_call``.
* **Which configurations** (read on every call, :class:`Configuration`): a trace freezes
  the Python values the forward read (``training`` flags, a stride, a slope), so it is
  kept per configuration — the modules' plain attributes. Hooks or parametrizations on
  any module (a parametrized module's class is no longer a ``TRACEABLE`` type), or an
  active dropout (``training`` and ``p > 0``: random numbers), make a
  configuration untraced: ``functional_call`` runs it.
* **Tracing** (once per configuration): :class:`TracedForward` raises
  :class:`Untraceable` where the graph would not be a pure function of the tensors it is
  given (an in-place write, a plain tensor attribute, a module not traced through), and
  ``torch.fx`` raises :class:`torch.fx.proxy.TraceError` for control flow on tensor
  values; those two exceptions, and only they, mean "use ``functional_call``" for the
  configuration.
* **Verification** (once per configuration, :func:`verify`): the trace runs on the
  model's own tensors and a fixed probe input of the call's shape, dtype and device, and
  is used only if its output is bit-identical (values, shape, dtype, strides) to
  ``functional_call``'s. The probe is deterministic (no random numbers, no dependence on
  the call's values), and plain tensors work under ``vmap``/``grad``, so the decision is
  the same wherever the first call happens.

**The exact rewrite.** The trace is also rewritten (``rewrites="exact"``, the default):
``max_pool(relu(x))`` → ``relu(max_pool(x))`` where the ReLU feeds only the pool (1-, 2- or
3-d max pooling without indices). ReLU is monotone, so it commutes with a maximum:
values, first- and second-order gradients are bit-identical, and the ReLU touches a
quarter of the elements after 2×2 pooling (second-order MAML on the 4-block conv net,
B=8, one thread, loaded machine: 19–25 % less time at 1 inner step, 1–11 % at 5).
``rewrites="none"`` keeps the plain trace. (An earlier inexact im2col-GEMM level,
``"all"``, was removed: its gain at 5 inner steps was below 15 % and it broke
bit-identity with the peers.)

Private torch state read here: the hook registries of ``nn.Module`` (``_forward_hooks``
and friends, and the global ones in ``torch.nn.modules.module``) — torch has no public
way to ask whether a module has hooks. ``tests/algorithms/test_trace.py`` registers every
kind of hook and checks that each one is seen (checked on torch 2.13); if torch renames
them, that test fails.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.proxy import TraceError

from metaopt.errors import ConfigError

__all__ = ["REWRITES", "TRACEABLE", "Configuration", "TraceError", "TracedForward",
           "Untraceable", "rewrite_level", "traceable", "verify"]

REWRITES = ("exact", "none")
"""``exact`` (default): the bit-identical pool-before-ReLU rewrite; ``none``: plain trace."""

_BATCH_NORM_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

TRACEABLE: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    *_BATCH_NORM_RANKS, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Softmax, nn.LogSoftmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, *_DROPOUTS,
)
"""The module types a traced model may consist of (exact types, not subclasses: a
subclass may override ``forward``). Each is traced and verified in the tests."""


class Untraceable(Exception):
    """The model's graph is not a pure function of its parameters, buffers and input."""


def rewrite_level(rewrites: str | None) -> str:
    """The rewrite level (see :data:`REWRITES`); None means ``"exact"``."""
    if rewrites is None:
        return "exact"
    if rewrites == "all":
        raise ConfigError("rewrites='all' (im2col-GEMM convolutions) was removed; "
                          "use 'exact' (default) or 'none'")
    if rewrites not in REWRITES:
        raise ConfigError(f"rewrites must be one of {REWRITES}, got {rewrites!r}")
    return rewrites


_TRACEABLE_TYPES = frozenset(TRACEABLE)


def traceable(model: nn.Module) -> bool:
    """Whether ``model`` is built only from the module types of :data:`TRACEABLE`."""
    return all(type(m) in _TRACEABLE_TYPES for m in model.modules())


# --------------------------------------------------------------------------- tracing
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


def _check_rank(x: Tensor, ranks: tuple[int, ...], expected: str) -> Tensor:
    """``x``, after the rank check of a BatchNorm layer's forward (same error)."""
    if x.dim() not in ranks:
        raise ValueError(f"expected {expected} input (got {x.dim()}D input)")
    return x


_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _batch_norm_call(tracer: _FlatTracer, m: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record what ``BatchNorm*.forward`` computes for the module's current settings:
    ``F.batch_norm`` with the batch-statistics flag and buffers it would pass.

    In training mode with tracked running statistics the forward would write into them;
    ``FunctionalModel`` passes ``None`` for those buffers there (batch statistics,
    nothing updated), so the trace records exactly that call: ``F.batch_norm`` without
    running statistics. Verification against ``functional_call`` guards the rest.
    """
    path = tracer.path_of_module(m)
    untracked = m.training and m.track_running_stats  # buffers passed as None
    own = {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}

    def attr(name: str) -> torch.fx.Proxy | None:
        if (untracked and name in _NORM_BUFFERS) or own.get(name) is None:
            return None
        return tracer.create_proxy("get_attr", f"{path}.{name}", (), {})

    ranks = _BATCH_NORM_RANKS[type(m)]
    expected = "2D or 3D" if len(ranks) == 2 else f"{ranks[0]}D"
    x = tracer.create_proxy("call_function", _check_rank, (x, ranks, expected), {})
    bn_training = m.training or (own.get("running_mean") is None
                                 and own.get("running_var") is None)
    momentum = 0.0 if m.momentum is None else m.momentum
    return tracer.create_proxy(
        "call_function", F.batch_norm,
        (x, attr("running_mean"), attr("running_var"), attr("weight"), attr("bias"),
         bn_training, momentum, m.eps), {})


class TracedForward:
    """``model.forward`` as generated code ``fn(*tensors, x)`` over the tensors it reads.

    ``names`` are the parameter/buffer names (as in ``named_parameters()`` /
    ``named_buffers()``; a tied alias maps to the name ``named_parameters()`` keeps) whose
    values are passed, in order. ``fn`` includes the rewrites of ``rewrites``.
    Raises :class:`Untraceable` or :class:`torch.fx.proxy.TraceError` when the model
    cannot be traced into a pure function of those tensors.
    """

    def __init__(self, model: nn.Module, rewrites: str = "exact") -> None:
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
                    raise Untraceable(f"'{node.target[2:]}' is neither a parameter nor a "
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
                raise Untraceable(f"module '{node.target}' was not traced through")
            else:
                if node.op in ("call_function", "call_method") and _in_place(node):
                    raise Untraceable(f"'{node.target}' writes into a tensor in place")
                env[node] = flat.node_copy(node, env.__getitem__)
        if rewrites == "exact":
            _pool_before_relu(flat)
        flat.lint()
        self.module = torch.fx.GraphModule(root, flat)
        self.fn: Callable[..., object] = self.module.forward


def _in_place(node: torch.fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True


# --------------------------------------------------------------------------- the exact rewrite
_RELUS = (torch.relu, F.relu)
_MAX_POOLS = (torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
              F.max_pool1d, F.max_pool2d, F.max_pool3d)


def _is_relu(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "relu" and len(node.args) == 1 and not node.kwargs
    return (node.op == "call_function" and node.target in _RELUS and len(node.args) == 1
            and not node.kwargs.get("inplace", False))


def _is_max_pool(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MAX_POOLS
            and not node.kwargs.get("return_indices", False)
            and not (len(node.args) > 6 and node.args[6]))  # F.max_pool*'s return_indices


def _pool_before_relu(graph: torch.fx.Graph) -> bool:
    """``max_pool(relu(x))`` → ``relu(max_pool(x))`` where the ReLU feeds only the pool;
    whether anything changed."""
    changed = False
    for relu in list(graph.nodes):
        if not _is_relu(relu) or len(relu.users) != 1:
            continue
        pool = next(iter(relu.users))
        if not _is_max_pool(pool) or pool.args[0] is not relu or relu in pool.args[1:]:
            continue
        with graph.inserting_before(pool):
            new_pool = graph.create_node(pool.op, pool.target, (relu.args[0], *pool.args[1:]),
                                         dict(pool.kwargs))
            new_relu = graph.create_node(relu.op, relu.target, (new_pool,), dict(relu.kwargs))
        pool.replace_all_uses_with(new_relu)
        graph.erase_node(pool)
        graph.erase_node(relu)
        changed = True
    return changed


# --------------------------------------------------------------------------- configurations
_PLAIN = (bool, int, float, str, tuple, type(None))
_HOOK_REGISTRIES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                    "_backward_pre_hooks")
"""``nn.Module``'s per-module hook registries (private; no public query exists)."""


class Configuration:
    """What a trace of ``model`` bakes in, read cheaply on every call.

    For a model of :data:`TRACEABLE` modules the Python values a forward reads are the
    modules' plain public attributes (``training``, ``p``, ``stride``, …); their names are
    found once, their values read per call (a few µs). Calling returns the key of the
    current configuration, or None where it must not be traced: a module no longer of a
    :data:`TRACEABLE` type (``torch.nn.utils.parametrize`` swaps a parametrized module's
    class for a generated subclass), a hook (per module or global; ``__call__`` would do
    more than ``forward``), an active dropout (random numbers), or an attribute value that
    is not hashable.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.traceable = traceable(model)
        self.getters = [operator.attrgetter(*[k for k, v in vars(m).items()
                                              if k[0] != "_" and isinstance(v, _PLAIN)])
                        for m in self.modules]  # "training" is always among them
        self.dropouts = [m for m in self.modules if isinstance(m, _DROPOUTS)]

    def __call__(self) -> tuple | None:
        if not self.traceable or _global_hooks():
            return None
        for m in self.dropouts:
            if m.training and m.p > 0:
                return None
        key = []
        for m, get in zip(self.modules, self.getters):
            if type(m) not in _TRACEABLE_TYPES or _has_hooks(m):
                return None
            try:
                key.append(get(m))
            except AttributeError:  # an attribute was deleted since: do not trace
                return None
        key = tuple(key)
        try:
            hash(key)
        except TypeError:  # e.g. a list inside a tuple-valued attribute: cannot key a cache
            return None
        return key


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)  # the registries of _HOOK_REGISTRIES


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks
                or module._global_backward_hooks or module._global_backward_pre_hooks)


# --------------------------------------------------------------------------- verification
def probe_like(x: Tensor) -> Tensor | None:
    """A fixed input of ``x``'s shape, dtype and device (``sin(0.37·i)`` over the flat
    index; zeros for integer dtypes), or None for dtypes it does not cover (complex)."""
    if x.is_complex():
        return None
    if not x.is_floating_point():
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    flat = torch.arange(x.numel(), dtype=torch.float64, device=x.device)
    return torch.sin(flat * 0.37).reshape(x.shape).to(x.dtype)


def verify(fn: Callable[..., object], reference: Callable[[Tensor], object],
           tensors: list[Tensor], x: Tensor) -> bool:
    """Whether ``fn(*tensors, probe)`` is bit-identical to ``reference(probe)`` (values,
    shape, dtype and strides) on the probe input of :func:`probe_like`.

    ``tensors`` are the model's own (plain) tensors and the probe is made here, so the
    comparison runs on plain tensors even inside ``vmap``/``grad``; an error the model
    raises on the probe (e.g. a wrong input rank) comes from ``reference``, as it would
    from the call itself.
    """
    probe = probe_like(x)
    if probe is None:
        return False
    with torch.no_grad():
        expected = reference(probe)
        got = fn(*[t.detach() for t in tensors], probe)
    return (isinstance(got, Tensor) and isinstance(expected, Tensor)
            and got.shape == expected.shape and got.dtype == expected.dtype
            and got.stride() == expected.stride() and bool(torch.equal(got, expected)))
