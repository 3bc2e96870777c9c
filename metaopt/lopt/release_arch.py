"""How metaopt's architectures appear in learned_optimization releases, and the bounds on
their constructor arguments.

:mod:`metaopt.lopt.release` reads the files (msgpack and gin); this module knows what
the contents mean for each architecture:

* VeLO (gin class ``HyperV2``; ``MuHyperV2`` for μLO): which gin arguments the port
  honours (:func:`velo_release_config`), the Haiku theta layout
  (:func:`velo_release_shapes`) and its conversion to PyTorch layout and back
  (:func:`load_velo_release_params`, :func:`velo_release_params`);
* small_fc_lopt (gin class ``AdafacMLPLOpt``): :func:`small_fc_from_release`.

:func:`check_arguments` type-checks and bounds constructor arguments before anything is
allocated; it is applied to gin bindings and to the ``config`` of native checkpoints
alike, so ``hidden_size=10**5`` is refused with a clear message instead of attempting a
40 GB allocation. Every refusal is a :class:`~metaopt.lopt.release.ReleaseFormatError`
(or the error class the caller passes) naming the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaopt.errors import FormatError
from metaopt.lopt import features
from metaopt.lopt.release import (
    ReleaseFormatError,
    UnsupportedReleaseError,
    check_leaves,
    flatten_release_tree,
    flatten_tree,
)
from metaopt.lopt.small_fc import SmallFCLOpt
from metaopt.lopt.velo import VeLO

__all__ = [
    "RELEASE_DEFAULTS",
    "SMALL_FC_ARGUMENTS",
    "VELO_ARGUMENTS",
    "check_arguments",
    "load_velo_release_params",
    "small_fc_from_release",
    "velo_from_release",
    "velo_release_config",
    "velo_release_params",
    "velo_release_shapes",
]


# --------------------------------------------------------------------------- argument bounds


@dataclass(frozen=True)
class ArgumentSpec:
    """Type and bounds of one constructor argument.

    ``kind`` is ``"int"`` (a Python int, not a bool and not 4.0), ``"real"`` (an int or a
    float, finite, not a bool), ``"bool"`` (exactly True or False) or ``"decays"`` (a
    list/tuple of reals with ``min_len <= len <= max_len``). ``lo``/``hi`` bound numbers
    and every decay (inclusive).
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    min_len: int = 1
    max_len: int = 1


def _int(lo: int, hi: int) -> ArgumentSpec:
    return ArgumentSpec("int", lo, hi)


_REAL = ArgumentSpec("real")
_BOOL = ArgumentSpec("bool")
_UNIT = ArgumentSpec("real", 0.0, 1.0)


def _decays(min_len: int, max_len: int) -> ArgumentSpec:
    return ArgumentSpec("decays", 0.0, 1.0, min_len, max_len)


#: VeLO's constructor arguments. The size bounds are far above any trained VeLO (the
#: release uses 512 / 256 / 4 / 2) and keep the largest module near 150M numbers.
VELO_ARGUMENTS: dict[str, ArgumentSpec] = {
    "lstm_hidden_size": _int(1, 4096),
    "param_inits": _int(1, 4096),
    "ff_hidden_size": _int(1, 1024),
    "ff_hidden_layers": _int(0, 16),
    "initial_momentum_decays": _decays(3, 3),
    "initial_rms_decays": _decays(1, 1),
    "initial_adafactor_decays": _decays(3, 3),
    "mix_layers": _BOOL,
    "exp_mult": _REAL,
    "step_mult": _REAL,
    "param_scale_mult": _BOOL,
    "use_bugged_next_lstm_state": _BOOL,
    "use_bugged_loss_features": _BOOL,
    "rnn_state_decay": _UNIT,
}

#: small_fc_lopt's constructor arguments (the reference uses hidden 4, 2 layers).
SMALL_FC_ARGUMENTS: dict[str, ArgumentSpec] = {
    "exp_mult": _REAL,
    "step_mult": _REAL,
    "hidden_size": _int(1, 1024),
    "hidden_layers": _int(0, 16),
    "initial_momentum_decays": _decays(1, 8),
    "initial_rms_decays": _decays(1, 8),
    "initial_adafactor_decays": _decays(1, 8),
}


def _argument_specs(cls: type) -> dict[str, ArgumentSpec]:
    if issubclass(cls, VeLO):
        return VELO_ARGUMENTS
    if issubclass(cls, SmallFCLOpt):
        return SMALL_FC_ARGUMENTS
    return {}


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_value(name: str, value: Any, spec: ArgumentSpec, *,
                error: type[FormatError] = ReleaseFormatError, where: str = "") -> Any:
    """``value`` normalised (int, float, bool or tuple of floats), or ``error`` naming
    ``where`` and ``name``."""
    prefix = f"{where}: " if where else ""

    def refuse(what: str) -> FormatError:
        return error(f"{prefix}argument {name!r} {what}")

    def number(v: Any, label: str) -> float:
        if not _is_real(v):
            raise refuse(f"must be a number{label}, got {type(v).__name__} {_short(v)}")
        x = float(v)
        if not math.isfinite(x):
            raise refuse(f"must be finite{label}, got {x}")
        if (spec.lo is not None and x < spec.lo) or (spec.hi is not None and x > spec.hi):
            raise refuse(f"must lie in [{spec.lo}, {spec.hi}]{label}, got {x}")
        return x

    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise refuse(f"must be True or False, got {type(value).__name__} {_short(value)}")
        return value
    if spec.kind == "int":
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise refuse(f"must be an integer, got {type(value).__name__} {_short(value)}")
        if not spec.lo <= value <= spec.hi:  # type: ignore[operator]
            raise refuse(f"must lie in [{spec.lo}, {spec.hi}], got {_short(value)}")
        return int(value)
    if spec.kind == "real":
        return number(value, "")
    if spec.kind == "decays":
        if not isinstance(value, list | tuple):
            raise refuse(f"must be a list of decays, got {type(value).__name__} {_short(value)}")
        if not spec.min_len <= len(value) <= spec.max_len:
            count = (str(spec.min_len) if spec.min_len == spec.max_len
                     else f"{spec.min_len} to {spec.max_len}")
            raise refuse(f"must hold {count} decays, got {len(value)}")
        return tuple(number(v, f" (entry {i})") for i, v in enumerate(value))
    raise ValueError(f"unknown argument kind {spec.kind!r}")  # pragma: no cover


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str | int | float | bool | None) else "value"
    return text if len(text) <= 40 else text[:37] + "..."


def check_arguments(cls: type, config: Mapping[str, Any], *,
                    error: type[FormatError] = ReleaseFormatError,
                    where: str = "") -> dict[str, Any]:
    """Type-check and bound the constructor arguments ``config`` of architecture ``cls``.

    Known arguments of VeLO- and small_fc-derived classes are checked against
    :data:`VELO_ARGUMENTS` / :data:`SMALL_FC_ARGUMENTS`; other keys are passed through
    (the constructor decides). Returns the normalised arguments. The architecture-level
    constraints (VeLO needs 3/1/3 decays, small_fc's momentum and adafactor decays must
    broadcast) are checked too, so the constructor is never reached with bad input.
    """
    if not isinstance(config, Mapping):
        raise error(f"{where}: config must be a mapping, got {type(config).__name__}")
    specs = _argument_specs(cls)
    out: dict[str, Any] = {}
    for name, value in config.items():
        if not isinstance(name, str):
            raise error(f"{where}: config keys must be strings, got {type(name).__name__}")
        out[name] = check_value(name, value, specs[name], error=error, where=where) \
            if name in specs else value
    if issubclass(cls, SmallFCLOpt):
        n_mom = len(out.get("initial_momentum_decays", (0, 0, 0)))
        n_fac = len(out.get("initial_adafactor_decays", (0, 0, 0)))
        if n_mom != n_fac and 1 not in (n_mom, n_fac):
            raise error(f"{where}: initial_momentum_decays ({n_mom}) and "
                        f"initial_adafactor_decays ({n_fac}) must have the same length or 1")
    return out


# --------------------------------------------------------------------------- VeLO

#: ``HyperV2``'s own constructor defaults (what a gin file that binds nothing means).
RELEASE_DEFAULTS: dict[str, Any] = {
    "lstm_hidden_size": 128,
    "ff_hidden_size": 4,
    "ff_hidden_layers": 2,
    "initial_momentum_decays": (0.9, 0.99, 0.999),
    "initial_rms_decays": (0.999,),
    "initial_adafactor_decays": (0.9, 0.99, 0.999),
    "param_inits": 64,
    "mix_layers": True,
    "exp_mult": 0.001,
    "step_mult": 0.001,
    "param_scale_mult": True,
    "use_bugged_next_lstm_state": False,
    "use_bugged_loss_features": True,
    "rnn_state_decay": 0.0,
}
#: HyperV2 arguments whose non-default values this port does not implement.
_UNSUPPORTED = {
    "validation_mode": False, "with_validation_feature_dim": False,
    "with_g": True, "with_m": True, "with_m_feat": True, "with_rms": True,
    "with_rms_feat": True, "with_rms_norm_g": True, "with_rsqrt_rms": True, "with_p": True,
    "with_fac_norm_g": True, "with_fac_rms": True, "with_fac_rsqrt": True,
    "with_grad_clip_feat": True, "with_fac_mom_mult": True, "with_rms_only_norm_g": True,
    "adafactor_accumulator": True, "precondition_output": False, "constant_loss": False,
    "clip_param_scale_amount": None,
    # MuHyperV2 (μLO) extras.
    "interp_mult": 100.0, "identity_lstm_controls": False, "identity_lr_mult": False,
}
#: Arguments that only change logging or nothing at all in the reference.
_IGNORED = {"summarize_each_layer", "summarize_all_control", "reparam_decay"}

#: Haiku's split of the per-parameter MLP's first layer: ``ff_mod_stack/~/w0__<i>`` holds
#: the rows of input group ``i`` (widths in channel order; 30 channels in all).
_W0_GROUP_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
#: Width of the per-tensor RNN input (the ``rnn_params/linear*`` layers read it).
_N_RNN_IN = 30


def velo_release_config(gin_bindings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Constructor arguments meant by a release's gin bindings, checked and bounded.

    Keys may be bare (``lstm_hidden_size``) or scoped (``HyperV2.lstm_hidden_size``);
    bindings for other configurables are ignored. Unbound arguments take HyperV2's
    own defaults (so an unbound ``use_bugged_loss_features`` means True). An argument the
    port does not implement raises :class:`~metaopt.lopt.release.UnsupportedReleaseError`
    (a ``NotImplementedError``); an unknown one or a value of the wrong type or size
    raises :class:`~metaopt.lopt.release.ReleaseFormatError`.
    """
    if gin_bindings is not None and not isinstance(gin_bindings, Mapping):
        raise ReleaseFormatError(f"HyperV2 bindings must be a mapping, "
                                 f"got {type(gin_bindings).__name__}")
    cfg = dict(RELEASE_DEFAULTS)
    for key, value in (gin_bindings or {}).items():
        if not isinstance(key, str):
            raise ReleaseFormatError(f"HyperV2 binding names must be strings, got {key!r}")
        name = key
        if "." in key:
            scope, name = key.rsplit(".", 1)
            if scope.split("/")[-1] not in ("HyperV2", "MuHyperV2"):
                continue
        if name in cfg:
            cfg[name] = check_value(f"HyperV2.{name}", value, VELO_ARGUMENTS[name])
        elif name in _UNSUPPORTED:
            default = _UNSUPPORTED[name]
            if isinstance(value, bool) != isinstance(default, bool) or value != default:
                raise UnsupportedReleaseError(
                    f"HyperV2.{name}={_short(value)} is not supported by this port "
                    f"(only the default {default!r})")
        elif name not in _IGNORED:
            raise ReleaseFormatError(f"unknown HyperV2 binding '{key}'")
    return cfg


def _velo_sizes(config: Mapping[str, Any]) -> list[int]:
    """Output widths of the per-parameter MLP's layers."""
    return [int(config["ff_hidden_size"])] * int(config["ff_hidden_layers"]) + [3]


def velo_release_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``/``-joined Haiku leaf paths and shapes of the theta of VeLO configuration
    ``config`` (constructor arguments; computed without building anything)."""
    h, k = int(config["lstm_hidden_size"]), int(config["param_inits"])
    sizes = _velo_sizes(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for gi, width in enumerate(_W0_GROUP_WIDTHS):
        shapes[f"ff_mod_stack/~/w0__{gi}"] = (k, width, sizes[0])
    for li, fan_out in enumerate(sizes):
        shapes[f"ff_mod_stack/~/b{li}"] = (k, fan_out)
        if li > 0:
            shapes[f"ff_mod_stack/~/w{li}"] = (k, sizes[li - 1], fan_out)
    shapes["lstm_init_state/hidden"] = (1, h)
    shapes["lstm_init_state/cell"] = (1, h)
    for name in ("linear", "linear_1", "linear_2"):
        shapes[f"rnn_params/{name}/w"] = (_N_RNN_IN, h)
        shapes[f"rnn_params/{name}/b"] = (h,)
    shapes["rnn_params/rnn/linear/w"] = (2 * h, 4 * h)
    shapes["rnn_params/rnn/linear/b"] = (4 * h,)
    shapes["rnn_params/rnn_to_controls/w"] = (h, k)
    shapes["rnn_params/rnn_to_controls/b"] = (k,)
    shapes["rnn_params/step_size/w"] = (h, 1)
    shapes["rnn_params/step_size/b"] = (1,)
    return shapes


def _velo_what(config: Mapping[str, Any]) -> str:
    return (f"VeLO release theta (lstm_hidden_size={config['lstm_hidden_size']}, "
            f"param_inits={config['param_inits']})")


def velo_from_release(cls: type[VeLO], params_tree: Mapping[str, Any],
                      gin_bindings: Mapping[str, Any] | None = None) -> VeLO:
    """Build ``cls`` (VeLO or a subclass) from a release's theta pytree and gin bindings.

    ``params_tree`` is the decoded ``params`` map of the msgpack (nested dicts of
    arrays; the whole checkpoint container, or a flat ``"a/b/c"``-keyed dict are
    accepted too). The arguments are checked first, then every leaf against the shapes
    they imply (missing, unexpected and mis-shaped keys listed in one
    :class:`~metaopt.lopt.release.ReleaseFormatError`; integer, complex, NaN or infinite
    leaves refused), and only then is the module built.
    """
    config = velo_release_config(gin_bindings)
    leaves = check_leaves(flatten_release_tree(params_tree), velo_release_shapes(config),
                          what=_velo_what(config))
    lopt = cls(**config, seed=None)
    _copy_velo_leaves(lopt, leaves)
    return lopt


def load_velo_release_params(lopt: VeLO, params_tree: Mapping[str, Any]) -> None:
    """Copy a release theta (Haiku layout) into the existing module ``lopt``."""
    config = lopt.config()
    leaves = check_leaves(flatten_release_tree(params_tree), velo_release_shapes(config),
                          what=_velo_what(config))
    _copy_velo_leaves(lopt, leaves)


def _gates(h: int) -> tuple[slice, slice, slice, slice]:
    return tuple(slice(j * h, (j + 1) * h) for j in range(4))  # type: ignore[return-value]


@torch.no_grad()
def _copy_velo_leaves(lopt: VeLO, leaves: Mapping[str, np.ndarray]) -> None:
    def t(key: str) -> Tensor:
        return torch.from_numpy(np.array(leaves[key], dtype=np.float32, copy=True))

    h = lopt.lstm_hidden_size
    for name, layer in (("linear", lopt.mix_dead), ("linear_1", lopt.mix_pool),
                        ("linear_2", lopt.mix_in), ("rnn_to_controls", lopt.rnn_to_controls),
                        ("step_size", lopt.step_size)):
        layer.weight.copy_(t(f"rnn_params/{name}/w").T)
        layer.bias.copy_(t(f"rnn_params/{name}/b"))
    # Haiku LSTM: z = [x, h] @ W + b, gate blocks (i, g, f, o), forget gate + 1.
    w, b = t("rnn_params/rnn/linear/w"), t("rnn_params/rnn/linear/b")
    i, g, f, o = _gates(h)
    w = torch.cat([w[..., i], w[..., f], w[..., g], w[..., o]], -1)
    b = torch.cat([b[..., i], b[..., f], b[..., g], b[..., o]], -1)
    lopt.lstm.weight_ih.copy_(w[:h].T)
    lopt.lstm.weight_hh.copy_(w[h:].T)
    lopt.lstm.bias_ih.copy_(b)
    forget_one = torch.zeros(4 * h)
    forget_one[h:2 * h] = 1.0
    lopt.lstm.bias_hh.copy_(forget_one)
    lopt.lstm_init_hidden.copy_(t("lstm_init_state/hidden"))
    lopt.lstm_init_cell.copy_(t("lstm_init_state/cell"))
    lopt.ff_weights[0].copy_(torch.cat(
        [t(f"ff_mod_stack/~/w0__{gi}") for gi in range(len(_W0_GROUP_WIDTHS))], dim=1))
    for li in range(1, len(lopt.ff_weights)):
        lopt.ff_weights[li].copy_(t(f"ff_mod_stack/~/w{li}"))
    for li in range(len(lopt.ff_biases)):
        lopt.ff_biases[li].copy_(t(f"ff_mod_stack/~/b{li}"))


def velo_release_params(lopt: VeLO) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_velo_release_params`: theta as ``/``-keyed Haiku arrays."""
    h = lopt.lstm_hidden_size
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, layer in (("linear", lopt.mix_dead), ("linear_1", lopt.mix_pool),
                            ("linear_2", lopt.mix_in),
                            ("rnn_to_controls", lopt.rnn_to_controls),
                            ("step_size", lopt.step_size)):
            out[f"rnn_params/{name}/w"] = layer.weight.T.numpy().copy()
            out[f"rnn_params/{name}/b"] = layer.bias.numpy().copy()
        w = torch.cat([lopt.lstm.weight_ih.T, lopt.lstm.weight_hh.T], 0)
        forget_one = torch.zeros(4 * h)
        forget_one[h:2 * h] = 1.0
        b = lopt.lstm.bias_ih + (lopt.lstm.bias_hh - forget_one)  # exact when bias_hh=+1
        i, f, g, o = _gates(h)
        out["rnn_params/rnn/linear/w"] = torch.cat(
            [w[:, i], w[:, g], w[:, f], w[:, o]], 1).numpy()
        out["rnn_params/rnn/linear/b"] = torch.cat([b[i], b[g], b[f], b[o]]).numpy()
        out["lstm_init_state/hidden"] = lopt.lstm_init_hidden.numpy().copy()
        out["lstm_init_state/cell"] = lopt.lstm_init_cell.numpy().copy()
        start = 0
        for gi, width in enumerate(_W0_GROUP_WIDTHS):
            out[f"ff_mod_stack/~/w0__{gi}"] = lopt.ff_weights[0][
                :, start:start + width].numpy().copy()
            start += width
        for li in range(1, len(lopt.ff_weights)):
            out[f"ff_mod_stack/~/w{li}"] = lopt.ff_weights[li].numpy().copy()
        for li in range(len(lopt.ff_biases)):
            out[f"ff_mod_stack/~/b{li}"] = lopt.ff_biases[li].numpy().copy()
    return out


# --------------------------------------------------------------------------- small_fc_lopt

_SMALL_FC_IGNORED_FLAGS = ("concat_weights", "split_weights")


def small_fc_from_release(cls: type[SmallFCLOpt], tree: Mapping[str, Any],
                          bindings: Mapping[str, Any]) -> SmallFCLOpt:
    """Build ``cls`` from a learned_optimization ``AdafacMLPLOpt`` theta tree + gin bindings.

    Arguments are checked and bounded, then the tree against the shapes they imply,
    then the module is built and the (float32, finite) leaves copied in.
    """
    if not isinstance(bindings, Mapping):
        raise ReleaseFormatError(f"AdafacMLPLOpt bindings must be a mapping, "
                                 f"got {type(bindings).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in bindings.items():
        if key in SMALL_FC_ARGUMENTS:
            kwargs[key] = check_value(f"AdafacMLPLOpt.{key}", value, SMALL_FC_ARGUMENTS[key])
        elif key in _SMALL_FC_IGNORED_FLAGS:
            check_value(f"AdafacMLPLOpt.{key}", value, _BOOL)  # same weights either way
        elif key == "make_separate_weights" and value is False:
            continue
        elif key == "make_separate_weights":
            raise UnsupportedReleaseError(
                f"AdafacMLPLOpt.make_separate_weights = {_short(value)} is not supported")
        else:
            raise UnsupportedReleaseError(
                f"AdafacMLPLOpt.{key} = {_short(value)} is not supported")
    kwargs = check_arguments(cls, kwargs, where="AdafacMLPLOpt bindings")
    n_mom = len(kwargs.get("initial_momentum_decays", (0.9, 0.99, 0.999)))
    n_rms = len(kwargs.get("initial_rms_decays", (0.999,)))
    n_fac = len(kwargs.get("initial_adafactor_decays", (0.9, 0.99, 0.999)))
    hidden = int(kwargs.get("hidden_size", 4))
    layers = int(kwargs.get("hidden_layers", 2))
    n_in = SmallFCLOpt.feature_count(n_mom, n_rms, n_fac) + len(features.TIME_SCALES)
    sizes = [n_in] + [hidden] * layers + [2]
    expected: dict[tuple[str, ...], tuple[int, ...]] = {
        ("momentum_decays",): (n_mom,),
        ("rms_decays",): (n_rms,),
        ("adafactor_decays",): (n_fac,),
    }
    for i in range(len(sizes) - 1):
        expected[("nn", "~", f"w{i}")] = (sizes[i], sizes[i + 1])
        expected[("nn", "~", f"b{i}")] = (sizes[i + 1],)
    leaves = check_leaves(flatten_tree(tree), expected,
                          what="AdafacMLPLOpt (small_fc_lopt) params")
    lopt = cls(**kwargs)
    with torch.no_grad():
        for path, value in leaves.items():
            target = getattr(lopt, path[-1])
            if tuple(target.shape) != value.shape:  # pragma: no cover - layout drift guard
                raise ReleaseFormatError(f"small_fc_lopt's {path[-1]} has shape "
                                         f"{tuple(target.shape)}, the release {value.shape}")
            target.copy_(torch.from_numpy(value))
    return lopt
