"""Speed rewrites of a traced forward: same function, cheaper kernels.

:class:`~metaopt.algorithms._model.FunctionalModel` runs a model built from ``torch.nn``
modules as a :mod:`torch.fx` trace of its forward. :func:`rewrite` returns a copy of that
graph with two rules applied, both measured on the 4-block MAML conv net on CPU (one
thread, second-order MAML meta-step of one task: about 18% less time together):

* **pool before ReLU.** ``max_pool(relu(x))`` → ``relu(max_pool(x))`` where the ReLU feeds
  only the pool (1-, 2- or 3-d max pooling, no indices returned). ReLU is monotone, so it
  commutes with a maximum: values, first- and second-order gradients are bit-identical;
  the ReLU then touches a quarter of the elements (2×2 pooling). Exact, so on for every
  device and dtype.
* **im2col GEMM for thin convolutions.** A ``conv2d`` call becomes :func:`conv2d_gemm`,
  which at run time — for a 4-d, contiguous, float32 CPU input, ``groups == 1``, at most
  :data:`GEMM_MAX_COLUMNS` = ``C_in·kh·kw`` (the first layer of an image net: 1·3·3 = 9),
  no ``torch.func`` transform, autocast or ``__torch_function__`` override active —
  computes ``unfold`` + one ``addmm`` instead of oneDNN's convolution (for the 75×1×28×28
  query batch of the MAML benchmark: ~3–4 ms instead of ~20 ms), and otherwise calls
  ``F.conv2d`` itself. The result is returned as a channels-last-strided NCHW tensor (the
  GEMM's natural layout, no copy), so the layers after it also run channels-last, which
  oneDNN does faster here. Equal to ``F.conv2d`` up to float rounding (a different
  summation order; relative differences of order 1e-7 in values, 1e-5 in meta-gradients).

Because the conv rule reorders float sums, the rewritten graph is not bit-identical to
``functional_call``. ``FunctionalModel`` therefore keeps the unrewritten trace, verifies
it bit-for-bit as before, and uses the rewritten one only if, on the same first call of a
configuration, its output matches within :data:`VERIFY_REL_TOL` (relative to the largest
magnitude of the output) with the same shape, dtype and strides (a model output that
would come back channels-last is made contiguous again at the end of the graph). If the
rewritten graph ever raises (e.g. a ``.view`` that channels-last strides do not allow, on
a later input the verification did not exercise), that call and every later one in the
configuration run the unrewritten trace.

**Levels** (:data:`LEVELS`). The default, ``"exact"``, applies only the pool rule, so
meta-gradients stay bit-identical to ``functional_call`` and to higher/TorchOpt/
learn2learn. ``"all"`` adds the GEMM convolutions: on the MAML conv benchmark 0.65–0.70×
the fastest peer's time at one inner step, but meta-gradients then differ from the peers'
by 1.5e-4–3.9e-3 relative (float32 rounding amplified by the second-order unroll — the
peers' own float32 error against a float64 run is of the same order), above the 1e-4 the
parity check asks for, so it is opt-in: ``MAML(model, ..., rewrites="all")`` (any
algorithm), ``FunctionalModel(model, rewrites="all")``, or ``METAOPT_GRAPH_REWRITES=all``
in the environment before the algorithm is built. ``"none"`` (``METAOPT_GRAPH_REWRITES=0``)
runs the plain trace.
"""

from __future__ import annotations

import os

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = ["ENV_VAR", "GEMM_MAX_COLUMNS", "LEVELS", "VERIFY_REL_TOL", "close_enough",
           "conv2d_gemm", "level", "rewrite"]

ENV_VAR = "METAOPT_GRAPH_REWRITES"
"""Default rewrite level for models wrapped afterwards: ``0``/``none``, ``exact`` (the
default when unset) or ``1``/``all`` (see :data:`LEVELS`)."""

GEMM_MAX_COLUMNS = 32
"""Largest ``C_in·kh·kw`` the GEMM path takes (beyond a few dozen, oneDNN wins)."""

VERIFY_REL_TOL = 1e-5
"""Largest ``max|rewritten − reference| / max|reference|`` accepted on first use."""

_RELUS = (torch.relu, F.relu)
_MAX_POOLS = (torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
              F.max_pool1d, F.max_pool2d, F.max_pool3d)


LEVELS = ("none", "exact", "all")
"""``none``: no rewrite; ``exact`` (default): only rules whose results are bit-identical
(pool before ReLU); ``all``: also the im2col GEMM convolutions (float rounding changes)."""


def level(requested: str | bool | None = None) -> str:
    """The rewrite level: ``requested`` (``True`` = ``"all"``, ``False`` = ``"none"``), or
    for None the :data:`ENV_VAR` setting (``0``/``none``, ``exact``, ``1``/``all``),
    ``"exact"`` when unset."""
    if requested is None:
        requested = os.environ.get(ENV_VAR, "exact").strip().lower() or "exact"
        requested = {"0": "none", "off": "none", "1": "all", "on": "all"}.get(requested,
                                                                             requested)
    elif isinstance(requested, bool):
        requested = "all" if requested else "none"
    if requested not in LEVELS:
        raise ValueError(f"graph rewrites must be one of {LEVELS} (or a bool), got "
                         f"{requested!r} (from {ENV_VAR} if not passed)")
    return requested


def rewrite(graph: torch.fx.Graph, level: str = "all") -> torch.fx.Graph | None:
    """A rewritten copy of ``graph`` at ``level`` (see the module docstring), or None if
    no rule applies."""
    if level == "none":
        return None
    new = torch.fx.Graph()
    new.output(new.graph_copy(graph, {}))
    changed = _pool_before_relu(new)
    if level == "all" and _gemm_convolutions(new):
        _restore_output_layout(new)
        changed = True
    if not changed:
        return None
    new.lint()
    return new


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
    """``max_pool(relu(x))`` → ``relu(max_pool(x))`` where the ReLU feeds only the pool."""
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


def _gemm_convolutions(graph: torch.fx.Graph) -> bool:
    """Route every ``conv2d`` with ``groups == 1`` through :func:`conv2d_gemm`."""
    changed = False
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.conv2d:
            continue
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        padding = node.args[4] if len(node.args) > 4 else node.kwargs.get("padding", 0)
        if groups != 1 or padding == "same":
            continue
        node.target = conv2d_gemm
        changed = True
    return changed


def _restore_output_layout(graph: torch.fx.Graph) -> None:
    """Make the graph's tensor outputs contiguous where the GEMM left them channels-last."""
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        output.args = torch.fx.node.map_arg(
            output.args, lambda n: graph.call_function(_contiguous_tensor, (n,)))


def _contiguous_tensor(value: object) -> object:
    """``value.contiguous()`` for a tensor (a no-op if it already is), else ``value``."""
    return value.contiguous() if isinstance(value, Tensor) else value


def _gemm_applies(input: Tensor, weight: Tensor, bias: Tensor | None, padding: object,
                  groups: int) -> bool:
    """Whether :func:`conv2d_gemm` may take its GEMM path for these arguments."""
    if groups != 1 or (isinstance(padding, str) and padding != "valid"):
        return False
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)):
        return False
    if (input.dim() != 4 or weight.dim() != 4 or input.device.type != "cpu"
            or input.dtype != torch.float32 or weight.dtype != torch.float32
            or weight.device.type != "cpu"):
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if weight.shape[1] * weight.shape[2] * weight.shape[3] > GEMM_MAX_COLUMNS:
        return False
    if input.shape[0] == 0 or not input.is_contiguous():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # vmap, grad, jvp, …
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return not torch.overrides.has_torch_function((input, weight, bias))


def conv2d_gemm(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                stride: object = 1, padding: object = 0, dilation: object = 1,
                groups: int = 1) -> Tensor:
    """``F.conv2d`` with the same arguments; thin CPU float32 convolutions as im2col GEMM.

    See the module docstring for when the GEMM path is taken. Its result is
    ``out.view(N, oh, ow, C_out).permute(0, 3, 1, 2)``: NCHW shape, channels-last strides.
    """
    if not _gemm_applies(input, weight, bias, padding, groups):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    n, _, h, w = input.shape
    c_out, c_in, kh, kw = weight.shape
    if input.shape[1] != c_in:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)  # its error
    s, d = _pair(stride), _pair(dilation)
    p = (0, 0) if padding == "valid" else _pair(padding)
    oh = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    if oh <= 0 or ow <= 0:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    cols = F.unfold(input, (kh, kw), dilation=d, padding=p, stride=s)  # N, C·kh·kw, oh·ow
    cols = cols.transpose(1, 2).reshape(n * oh * ow, c_in * kh * kw)
    # A contiguous (C_in·kh·kw, C_out) right operand: autograd then forms the weight's
    # gradient as cols.t() @ grad (one well-shaped GEMM) rather than (grad.t() @ cols).t(),
    # which is ~2.5x slower here for the first layer (K = N·oh·ow ≈ 59k, 9 columns).
    w2 = weight.reshape(c_out, c_in * kh * kw).t().contiguous()
    out = torch.mm(cols, w2) if bias is None else torch.addmm(bias, cols, w2)
    return out.view(n, oh, ow, c_out).permute(0, 3, 1, 2)


def close_enough(got: object, expected: object) -> bool:
    """Whether a rewritten graph's output ``got`` may stand in for ``expected``.

    Tensors (or flat tuples/lists of tensors, compared pairwise): same shape, dtype and
    strides, NaNs and infinities in the same places, and
    ``max|got − expected| ≤ VERIFY_REL_TOL · max|expected|`` over the finite entries.
    """
    if isinstance(expected, (tuple, list)):
        return (type(got) is type(expected) and len(got) == len(expected)
                and all(close_enough(g, e) for g, e in zip(got, expected)))
    if not (isinstance(got, Tensor) and isinstance(expected, Tensor)):
        return False
    if (got.shape != expected.shape or got.dtype != expected.dtype
            or got.device != expected.device or got.stride() != expected.stride()):
        return False
    got, expected = got.detach(), expected.detach()
    if not (got.is_floating_point() or got.is_complex()):
        return bool(torch.equal(got, expected))
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(got)):
        return False
    if not torch.equal(got[~finite].nan_to_num(), expected[~finite].nan_to_num()):
        return False  # the same infinities (NaN vs NaN compares equal via nan_to_num)
    if not bool(finite.any()):
        return True
    scale = expected[finite].abs().max()
    return bool((got[finite] - expected[finite]).abs().max() <= VERIFY_REL_TOL * scale)
