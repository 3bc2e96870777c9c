"""μP (maximal update parametrisation) for task models, without the ``mup`` package.

μP (Yang & Hu et al., "Tensor Programs V", 2022) makes a network's feature updates
width-independent, so optimizer settings tuned on a narrow model carry over to wide
ones. For an MLP with width ``n = width_mult * base_width`` and Adam-like (sign-scale)
updates the rules are:

==============================  ==================  ===================  ===============
tensor                          init std            forward multiplier   update scale
==============================  ==================  ===================  ===============
input weight  (width × d_in)    1/sqrt(d_in)        1                    1
hidden weight (width × width)   1/sqrt(fan_in)      1                    1 / width_mult
biases (any layer)              0                   1                    1
readout weight (d_out × width)  0 (zero init)       1 / width_mult       1
==============================  ==================  ===================  ===============

"Matrix-like" tensors have two width-sized ("infinite") axes; their per-coordinate
update must shrink like ``1/fan_in`` because ``fan_in`` coordinates add up coherently.
"Vector-like" tensors (one infinite axis) keep the base update size. The readout's
``1/width_mult`` forward multiplier plays the role of the ``1/fan_in`` update scale for
the last layer (this is what ``mup.MuReadout`` and ``MuAdam`` do, and what μLO
meta-trains under).

The scales reach μLO explicitly, through ``init`` (its state), never through attributes
on parameters. This module gives the shape bookkeeping (:func:`infer_mup_info`), the update scales
μLO multiplies into each tensor's step (:func:`mup_update_scales`), a readout layer
(:class:`MuReadout`) and a μP MLP builder (:class:`MuMLP`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MuMLP",
    "MuPInfo",
    "MuReadout",
    "infer_mup_info",
    "mup_update_scales",
]

@dataclass(frozen=True)
class MuPInfo:
    """μP facts about one tensor.

    Attributes:
        kind: ``"hidden"`` (two infinite axes), ``"input"`` (only fan-out infinite),
            ``"output"`` (only fan-in infinite: a readout weight), ``"vector"`` (a
            rank-1 tensor along an infinite axis, e.g. a hidden bias) or ``"finite"``.
        fan_in_mult: ``fan_in / base_fan_in`` (1 for a finite fan-in).
        fan_out_mult: ``fan_out / base_fan_out``.
        width_mult: the multiplier μP scales by — ``fan_in_mult`` for matrix-like and
            readout tensors (as ``mup``'s ``InfShape.width_mult``), else ``fan_out_mult``.
    """

    kind: str
    fan_in_mult: float
    fan_out_mult: float
    width_mult: float

    @property
    def update_scale(self) -> float:
        """Per-coordinate update multiplier relative to the base model (μLO / MuAdam)."""
        return 1.0 / self.width_mult if self.kind == "hidden" else 1.0

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` under PyTorch's layout: weight ``(out, in, *kernel)``."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return int(shape[1]) * receptive, int(shape[0]) * receptive


def infer_mup_info(shapes: Mapping[str, Sequence[int] | Tensor],
                   base_shapes: Mapping[str, Sequence[int] | Tensor],
                   delta_shapes: Mapping[str, Sequence[int] | Tensor] | None = None,
                   ) -> dict[str, MuPInfo]:
    """Per-tensor :class:`MuPInfo` of a model from its base model's shapes.

    An axis is *infinite* when it differs between ``base_shapes`` and ``delta_shapes``
    (a second, differently wide model, as in ``mup.make_base_shapes``); without
    ``delta_shapes``, when it differs between ``base_shapes`` and ``shapes`` — then a
    model exactly as wide as its base is all-finite, which is also what μP prescribes
    for it (every multiplier is 1).

    Raises:
        KeyError: tensor names differ between the dicts.
        ValueError: a tensor's rank differs from its base's.
    """
    def as_shape(s):
        return tuple(s.shape) if isinstance(s, Tensor) else tuple(int(d) for d in s)

    if shapes.keys() != base_shapes.keys() or (
            delta_shapes is not None and delta_shapes.keys() != base_shapes.keys()):
        raise KeyError(f"tensor names differ: model {sorted(shapes)} vs base {sorted(base_shapes)}")
    infos = {}
    for name, s in shapes.items():
        shape, base = as_shape(s), as_shape(base_shapes[name])
        ref = base if delta_shapes is None else as_shape(delta_shapes[name])
        if len(shape) != len(base) or len(ref) != len(base):
            raise ValueError(f"'{name}': rank differs from the base model ({shape} vs {base})")
        inf = [a != b for a, b in zip(base, ref if delta_shapes is not None else shape)]
        if delta_shapes is not None and not any(inf):
            inf = [False] * len(shape)
        fan_in, fan_out = _fans(shape)
        base_in, base_out = _fans(base)
        in_mult, out_mult = fan_in / base_in, fan_out / base_out
        if len(shape) >= 2:
            inf_out, inf_in = inf[0], inf[1]
            kind = ("hidden" if inf_in and inf_out else "output" if inf_in
                    else "input" if inf_out else "finite")
        elif len(shape) == 1 and inf[0]:
            kind = "vector"
        else:
            kind = "finite"
        width = in_mult if kind in ("hidden", "output") else out_mult if kind != "finite" else 1.0
        infos[name] = MuPInfo(kind, in_mult, out_mult, width)
    return infos


def mup_update_scales(infos: Mapping[str, MuPInfo]) -> dict[str, float]:
    """Per-tensor update multipliers: ``1/width_mult`` for hidden weights, else 1."""
    return {name: info.update_scale for name, info in infos.items()}


class MuReadout(nn.Linear):
    """Readout layer under μP: zero init and output multiplied by ``1/width_mult``."""

    def __init__(self, in_features: int, out_features: int, *, width_mult: float = 1.0,
                 output_mult: float = 1.0, bias: bool = True, zero_init: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.width_mult = float(width_mult)
        self.output_mult = float(output_mult)
        if zero_init:
            with torch.no_grad():
                self.weight.zero_()
        if bias:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * (self.output_mult / self.width_mult), self.weight, self.bias)


class MuMLP(nn.Module):
    """An MLP in μP: ``in → width → … → width → out`` with a :class:`MuReadout`.

    ``width_mult = width / base_width``. Hidden and input weights get the standard
    ``N(0, 1/fan_in)`` init, biases zero, the readout zero init (``zero_readout``) and
    the ``1/width_mult`` output multiplier. :meth:`mup_info` gives the per-tensor
    :class:`MuPInfo` and :meth:`mup_scales` the update scales μLO's ``init`` takes.
    """

    def __init__(self, in_features: int, width: int, out_features: int, *, depth: int = 2,
                 base_width: int = 64, activation: type[nn.Module] = nn.ReLU,
                 zero_readout: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth (number of hidden layers) must be >= 1")
        self.in_features, self.width, self.out_features = in_features, width, out_features
        self.depth, self.base_width = depth, base_width
        self.width_mult = width / base_width
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            lin = nn.Linear(fan_in, width)
            with torch.no_grad():
                lin.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
                lin.bias.zero_()
            layers += [lin, activation()]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.readout = MuReadout(width, out_features, width_mult=self.width_mult,
                                 zero_init=zero_readout)
        if not zero_readout:
            with torch.no_grad():
                self.readout.weight.normal_(0.0, 1.0 / math.sqrt(width), generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.body(x))

    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the same MLP at ``base_width``."""
        return {name: self._axes(name, p, self.base_width) for name, p in
                self.named_parameters()}

    def _axes(self, name: str, p: Tensor, width: int) -> tuple[int, ...]:
        inf_out, inf_in = self._infinite_axes(name)
        dims = list(p.shape)
        if inf_out:
            dims[0] = width
        if inf_in and len(dims) > 1:
            dims[1] = width
        return tuple(dims)

    def _infinite_axes(self, name: str) -> tuple[bool, bool]:
        """(fan-out axis is width-sized, fan-in axis is width-sized), by layer position."""
        if name.startswith("readout."):
            return False, name.endswith("weight")
        layer = int(name.split(".")[1]) // 2
        return True, name.endswith("weight") and layer > 0

    def mup_info(self) -> dict[str, MuPInfo]:
        """Per-parameter :class:`MuPInfo`, by layer position (input, hidden, readout)."""
        return infer_mup_info(
            {n: self._axes(n, p, self.width) for n, p in self.named_parameters()},
            self.base_shapes(),
            {n: self._axes(n, p, self.base_width + 1) for n, p in self.named_parameters()})

    def mup_scales(self) -> dict[str, float]:
        """Per-parameter μP update scales (``named_parameters()`` names and order), for
        μLO: ``lopt.init(params, n, mup_scales=...)`` or, in parameter order,
        ``lopt.optimizer(model.parameters(), n, mup_scales=list(....values()))``."""
        return mup_update_scales(self.mup_info())
