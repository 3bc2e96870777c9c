"""VeLO: the per-tensor-LSTM hypernetwork learned optimizer (``HyperV2``).

VeLO (Metz et al., 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up")
is learned_optimization's ``research/general_lopt/hyper_v2.py::HyperV2``. One step:

1. the loss goes into a buffer of 10 running means; 9 *loss features* compare them;
2. every parameter tensor is summarised into 30 numbers (time left, loss features,
   log-variance of its momentum, log-mean of its second moment, its rank);
3. a small "mix" layer lets the tensors see each other (a max over tensors), then an
   LSTM — one row per tensor, its state carried across steps — emits 256 *controls*
   and a step multiplier ``lr_mult`` per tensor;
4. the controls mix 256 stored copies of a tiny per-parameter MLP into one MLP per
   tensor; that MLP reads 30 per-element features (gradient, parameter, momenta,
   second moments, Adafactor statistics) and outputs a direction and a magnitude;
5. ``p_new = p - lr_mult * direction * exp(0.001 * magnitude) * 0.001 * rms(p)``.

Compatibility flags of the released checkpoints are reproduced, bugs included:

* ``use_bugged_next_lstm_state=True`` never carries the LSTM state forward (every step
  starts again from the stored initial state) — the older "no_config" checkpoints;
* ``use_bugged_loss_features=True`` sizes the loss buffer for a 10-step run whatever
  the real horizon — the reference's class default;
* ``var_rms`` subtracts the mean of the *momentum* (3 decays) from the second moment,
  and the first "mix" layer is computed and thrown away (its weights stay in the
  checkpoint). Both are part of every trained VeLO and are always on.

The released VeLO uses ``lstm_hidden_size=512, param_inits=256,
use_bugged_loss_features=False`` — the defaults here. ``from_release`` instead starts
from the *reference's* defaults and applies the checkpoint's gin bindings, so a
release folder always means what it meant to learned_optimization.

Meta-parameters are stored in PyTorch layout: ``nn.Linear`` weights are ``(out, in)``
(Haiku stores ``(in, out)``) and the LSTM is an ``nn.LSTMCell`` (gate order i, f, g, o;
Haiku's order is i, g, f, o and it adds 1 to the forget gate, folded into the bias).

Vectorisation: the per-tensor LSTM runs once per step over all tensors as one batch;
per-element features that are constant along a factored axis (the Adafactor row/column
statistics, 12 of the 30 channels) are pushed through the first MLP layer on the
*reduced* arrays and broadcast afterwards; the per-channel normalisation is folded into
the first-layer weights. Nothing loops over elements in Python; the only Python loop is
over parameter tensors (each has its own mixed MLP).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.lopt import cpu_kernels, velo_kernels
from metaopt.lopt.base import LearnedOptimizer, LOptState, apply_step_, register_architecture
from metaopt.params import Params
from metaopt.tree import tree_leaves

__all__ = [
    "VeLO",
    "factored_dims",
    "loss_buffer_features",
    "loss_buffer_init",
    "loss_buffer_step",
    "loss_buffer_update",
]

#: Number of input channels of the per-parameter MLP, per input group (Haiku's
#: ``w0__0 .. w0__13``): g, clip(g), p, m, rms, m*rsqrt(rms), rsqrt(rms), fac_g,
#: g*rsqrt(rms), row, col, rsqrt(row), rsqrt(col), m*row_factor*col_factor.
_GROUP_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
_GROUP_START = tuple(int(s) for s in np.cumsum((0, *_GROUP_WIDTHS))[:-1])
_N_FF_IN = sum(_GROUP_WIDTHS)  # 30
#: Channels that vary per element (everything except the Adafactor row/col groups).
_FULL_CHANNELS = [c for gi in (0, 1, 2, 3, 4, 5, 6, 7, 8, 13)
                  for c in range(_GROUP_START[gi], _GROUP_START[gi] + _GROUP_WIDTHS[gi])]
_N_FULL = len(_FULL_CHANNELS)  # 18
_ROW_CHANNELS = list(range(_GROUP_START[9], _GROUP_START[9] + 3)) + list(
    range(_GROUP_START[11], _GROUP_START[11] + 3))
_COL_CHANNELS = list(range(_GROUP_START[10], _GROUP_START[10] + 3)) + list(
    range(_GROUP_START[12], _GROUP_START[12] + 3))
_FULL_CHANNELS_T, _ROW_CHANNELS_T, _COL_CHANNELS_T = (
    tuple(_FULL_CHANNELS), tuple(_ROW_CHANNELS), tuple(_COL_CHANNELS))
_N_RNN_IN = 30
_FRACTION_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
_N_LOSS_DECAYS = 10

# ----------------------------------------------------------------------------- helpers


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """Adafactor's ``(d1, d0)``: the second-largest and largest axis, or None below rank 2.

    Uses NumPy's default ``argsort`` exactly as the reference does, so ties resolve the
    same way (``(3, 3, 2, 4)`` → ``(1, 3)``).
    """
    if len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape))
    return int(order[-2]), int(order[-1])


def _safe_rsqrt(x: Tensor) -> Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def _clip_log_abs(v: Tensor, scale: float = 10.0) -> Tensor:
    return torch.clamp(torch.log(1e-8 + torch.abs(v * scale)), -5.0, 5.0) * 0.5


def _mean_sq(p: Tensor) -> Tensor:
    p32 = p.reshape(-1).to(torch.float32)
    return torch.dot(p32, p32) / p32.numel()


def _var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Population variance and mean of each row of ``x`` (two passes, one temporary;
    ``torch.var_mean`` is an order of magnitude slower on CPU)."""
    mean = x.mean(dim=1)
    var = torch.square(torch.linalg.vector_norm(x - mean.unsqueeze(1), dim=1)) / x.shape[1]
    return var, mean


@functools.lru_cache(maxsize=64)
def _constant_cached(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A float32 constant vector (cached per device; never written to)."""
    return _constant_cached(values, torch.device(device))


@functools.lru_cache(maxsize=256)
def _rank_features_cached(ranks: tuple[int, ...], device: torch.device) -> Tensor:
    return F.one_hot(torch.tensor(ranks), 6)[:, :5].to(device=device,
                                                       dtype=torch.float32).contiguous()


def _rank_features(shapes: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """VeLO's one-hot rank feature (rank capped at 5) of each tensor, (n, 5)."""
    ranks = tuple(min(_tensor_info(tuple(shape)).rank, 5) for shape in shapes)
    return _rank_features_cached(ranks, torch.device(device))


def _tensor_rank(shape: Sequence[int]) -> int:
    """VeLO's rank feature: the number of axes longer than 1."""
    return int(sum(1 for s in shape if s > 1))


@functools.lru_cache(maxsize=4096)
def _tensor_info(shape: tuple[int, ...]) -> _TensorInfo:
    shape1d = shape if len(shape) else (1,)
    return _TensorInfo(shape, shape1d, factored_dims(shape1d), _tensor_rank(shape))


# ------------------------------------------------------------------------- loss buffer


def loss_buffer_init(num_steps: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Ten running means of the loss with half-lives log-spaced from 10 to ``num_steps``."""
    exponents = torch.linspace(1.0, float(np.log10(np.float32(num_steps))), _N_LOSS_DECAYS,
                               dtype=torch.float32)
    halflife = torch.pow(torch.tensor(10.0, dtype=torch.float32), exponents)
    decays = torch.exp(-1.0 / halflife)
    return {
        "means": torch.zeros(_N_LOSS_DECAYS, dtype=torch.float32, device=device),
        "running_min": torch.full((_N_LOSS_DECAYS,), 999999999999.0, dtype=torch.float32,
                                  device=device),
        "decays": decays.to(device),
        "iteration": torch.zeros((), dtype=torch.int32, device=device),
    }


def loss_buffer_update(buf: Mapping[str, Tensor], loss: Tensor) -> dict[str, Tensor]:
    """Feed one loss: cap it at twice the largest running mean, then update means and min."""
    return _loss_buffer_update(buf, loss)[0]


def loss_buffer_features(buf: Mapping[str, Tensor]) -> Tensor:
    """Nine features in [-1, 1]: where each running mean sits between the minimum and the
    next-slower mean; all zero for the first two steps."""
    bias = 1.0 - buf["decays"] ** buf["iteration"].to(torch.float32)
    return _loss_buffer_features(buf, bias)


def loss_buffer_step(buf: Mapping[str, Tensor], loss: Tensor
                     ) -> tuple[dict[str, Tensor], Tensor]:
    """``loss_buffer_update(buf, loss)`` and the :func:`loss_buffer_features` of the result
    (the same tensors), sharing the bias correction ``1 - decays**(iteration + 1)``."""
    new_buf, bias = _loss_buffer_update(buf, loss)
    return new_buf, _loss_buffer_features(new_buf, bias)


def _loss_buffer_update(buf: Mapping[str, Tensor], loss: Tensor
                        ) -> tuple[dict[str, Tensor], Tensor]:
    """The new buffer and its bias correction ``1 - decays**iteration`` (new iteration)."""
    decays, means, it = buf["decays"], buf["means"], buf["iteration"]
    loss = loss.to(torch.float32).reshape(())
    it_next = it + 1
    bias = 1.0 - decays ** it_next.to(torch.float32)
    approx_max = torch.where(it == 0, loss, torch.max(means / bias))
    loss = torch.minimum(torch.abs(approx_max) * 2.0, loss)
    new_means = means * decays + loss * (1.0 - decays)
    running_min = torch.minimum(buf["running_min"], new_means / bias)
    return ({"means": new_means, "running_min": running_min, "decays": decays,
             "iteration": it_next}, bias)


def _loss_buffer_features(buf: Mapping[str, Tensor], bias: Tensor) -> Tensor:
    """:func:`loss_buffer_features` given ``bias = 1 - decays**iteration``."""
    cor_mean = buf["means"] / bias
    running_min = buf["running_min"][:-1]
    den = torch.clamp(cor_mean[1:] - running_min, min=1e-8)
    feat = torch.clamp((cor_mean[:-1] - running_min) / den - 1.0, -1.0, 1.0)
    return torch.where(buf["iteration"] <= 2, feat * 0.0, feat)


# ------------------------------------------------------------------------ the optimizer


@dataclass(frozen=True)
class _TensorInfo:
    """Static facts about one task tensor (computed from its shape)."""

    shape: tuple[int, ...]
    shape1d: tuple[int, ...]  # scalars are treated as shape (1,)
    factored: tuple[int, int] | None
    rank: int


@register_architecture
class VeLO(LearnedOptimizer):
    """VeLO (``HyperV2``) with pure ``init``/``update`` over parameter dicts.

    Args:
        lstm_hidden_size: width of the per-tensor LSTM (512 for the released VeLO).
        param_inits: number of stored per-parameter MLPs mixed by the controls (256).
        ff_hidden_size, ff_hidden_layers: per-parameter MLP shape (4, 2).
        initial_momentum_decays, initial_rms_decays, initial_adafactor_decays: the
            fixed accumulator decays (3, 1 and 3 of them).
        mix_layers: the cross-tensor max-pooled input layer.
        exp_mult, step_mult: output scalings of the magnitude and of the step.
        param_scale_mult: multiply the step by ``rms(p)`` of the tensor.
        use_bugged_next_lstm_state, use_bugged_loss_features: compatibility flags.
        rnn_state_decay: shrink the carried LSTM state by ``1 - rnn_state_decay``.
    """

    architecture = "velo"
    needs_loss = True
    #: Gin class names of learned_optimization releases this class imports.
    release_names = ("HyperV2",)

    def __init__(
        self,
        lstm_hidden_size: int = 512,
        param_inits: int = 256,
        ff_hidden_size: int = 4,
        ff_hidden_layers: int = 2,
        initial_momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
        initial_rms_decays: Sequence[float] = (0.999,),
        initial_adafactor_decays: Sequence[float] = (0.9, 0.99, 0.999),
        mix_layers: bool = True,
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
        param_scale_mult: bool = True,
        use_bugged_next_lstm_state: bool = False,
        use_bugged_loss_features: bool = False,
        rnn_state_decay: float = 0.0,
        *,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if len(initial_momentum_decays) != 3 or len(initial_adafactor_decays) != 3 \
                or len(initial_rms_decays) != 1:
            raise ValueError("VeLO's input layout needs 3 momentum, 1 rms and 3 adafactor decays")
        self.lstm_hidden_size = int(lstm_hidden_size)
        self.param_inits = int(param_inits)
        self.ff_hidden_size = int(ff_hidden_size)
        self.ff_hidden_layers = int(ff_hidden_layers)
        self.initial_momentum_decays = tuple(float(d) for d in initial_momentum_decays)
        self.initial_rms_decays = tuple(float(d) for d in initial_rms_decays)
        self.initial_adafactor_decays = tuple(float(d) for d in initial_adafactor_decays)
        self.mix_layers = bool(mix_layers)
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        self.param_scale_mult = bool(param_scale_mult)
        self.use_bugged_next_lstm_state = bool(use_bugged_next_lstm_state)
        self.use_bugged_loss_features = bool(use_bugged_loss_features)
        self.rnn_state_decay = float(rnn_state_decay)

        h, k, w = self.lstm_hidden_size, self.param_inits, self.ff_hidden_size
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # Per-tensor network. `mix_dead` mirrors the reference's discarded layer.
        self.mix_dead = nn.Linear(_N_RNN_IN, h)
        self.mix_pool = nn.Linear(_N_RNN_IN, h)
        self.mix_in = nn.Linear(_N_RNN_IN, h)
        self.lstm = nn.LSTMCell(h, h)
        self.rnn_to_controls = nn.Linear(h, k)
        self.step_size = nn.Linear(h, 1)
        self.lstm_init_hidden = nn.Parameter(torch.zeros(1, h))
        self.lstm_init_cell = nn.Parameter(torch.zeros(1, h))
        # The stack of `param_inits` per-parameter MLPs, weights (in, out) per copy.
        sizes = [_N_FF_IN] + [w] * self.ff_hidden_layers + [3]
        self.ff_weights = nn.ParameterList()
        self.ff_biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            wt = torch.empty(k, fan_in, fan_out)
            nn.init.trunc_normal_(wt, std=1.0 / math.sqrt(fan_in), a=-2.0 / math.sqrt(fan_in),
                                  b=2.0 / math.sqrt(fan_in), generator=gen)
            self.ff_weights.append(nn.Parameter(wt))
            self.ff_biases.append(nn.Parameter(torch.zeros(k, fan_out)))
        with torch.no_grad():  # the reference initialises rnn_to_controls at zero
            self.rnn_to_controls.weight.zero_()

    # ------------------------------------------------------------------ construction

    def config(self) -> dict[str, Any]:
        return {
            "lstm_hidden_size": self.lstm_hidden_size,
            "param_inits": self.param_inits,
            "ff_hidden_size": self.ff_hidden_size,
            "ff_hidden_layers": self.ff_hidden_layers,
            "initial_momentum_decays": list(self.initial_momentum_decays),
            "initial_rms_decays": list(self.initial_rms_decays),
            "initial_adafactor_decays": list(self.initial_adafactor_decays),
            "mix_layers": self.mix_layers,
            "exp_mult": self.exp_mult,
            "step_mult": self.step_mult,
            "param_scale_mult": self.param_scale_mult,
            "use_bugged_next_lstm_state": self.use_bugged_next_lstm_state,
            "use_bugged_loss_features": self.use_bugged_loss_features,
            "rnn_state_decay": self.rnn_state_decay,
        }

    # ------------------------------------------------------------------ release import
    # The release format lives in metaopt.lopt.release_arch; these delegate to it.

    @classmethod
    def release_config(cls, gin_bindings: Mapping[str, Any] | None) -> dict[str, Any]:
        """Constructor arguments meant by a release's gin bindings (see
        :func:`metaopt.lopt.release_arch.velo_release_config`)."""
        from metaopt.lopt.release_arch import velo_release_config

        return velo_release_config(gin_bindings)

    @classmethod
    def from_release(cls, params_tree: Mapping[str, Any],
                     gin_bindings: Mapping[str, Any] | None = None) -> VeLO:
        """Build from a learned_optimization release: its theta pytree and gin bindings
        (see :func:`metaopt.lopt.release_arch.velo_from_release`)."""
        from metaopt.lopt.release_arch import velo_from_release

        return velo_from_release(cls, params_tree, gin_bindings)

    def release_params(self) -> dict[str, np.ndarray]:
        """Theta in the release's ``/``-keyed Haiku layout (inverse of the import)."""
        from metaopt.lopt.release_arch import velo_release_params

        return velo_release_params(self)

    # ------------------------------------------------------------------ functional core

    @staticmethod
    def _info(shape: Sequence[int]) -> _TensorInfo:
        return _tensor_info(tuple(int(s) for s in shape))

    def init(self, params: Params, num_steps: int) -> LOptState:
        """Zero accumulators, the loss buffer for ``num_steps`` and the initial LSTM state.

        ``state["mom"][k]`` is ``shape + (3,)``, ``state["rms"][k]`` is ``shape + (1,)``;
        Adafactor statistics follow the reference (``v_row``/``v_col`` for rank >= 2,
        ``v_diag`` otherwise; the unused ones have shape ``(0, 3)``). The LSTM state is
        kept per tensor too (``state["lstm_hidden"][k]`` of shape ``(hidden,)``), so any
        subset or order of tensors can be stepped.
        """
        if num_steps is None or int(num_steps) < 1:
            raise ValueError("VeLO needs the run length: init(params, num_steps>=1)")
        mom, rms, v_row, v_col, v_diag = {}, {}, {}, {}, {}
        for key, p in params.items():
            dev, info = p.device, self._info(p.shape)
            f32 = {"dtype": torch.float32, "device": dev}
            mom[key] = torch.zeros(*info.shape, 3, **f32)
            rms[key] = torch.zeros(*info.shape, 1, **f32)
            empty = torch.zeros(0, 3, **f32)
            if info.factored is not None:
                d1, d0 = info.factored
                v_row[key] = torch.zeros(*(s for a, s in enumerate(info.shape) if a != d0), 3,
                                         **f32)
                v_col[key] = torch.zeros(*(s for a, s in enumerate(info.shape) if a != d1), 3,
                                         **f32)
                v_diag[key] = empty
            else:
                v_row[key], v_col[key] = empty, empty.clone()
                v_diag[key] = torch.zeros(*info.shape, 3, **f32)
        device = next(iter(params.values())).device if params else None
        init_h = self.lstm_init_hidden.detach().to(device)[0]
        init_c = self.lstm_init_cell.detach().to(device)[0]
        buffer_steps = 10 if self.use_bugged_loss_features else int(num_steps)
        return {
            "mom": mom, "rms": rms, "v_row": v_row, "v_col": v_col, "v_diag": v_diag,
            "lstm_hidden": {k: init_h.clone() for k in params},
            "lstm_cell": {k: init_c.clone() for k in params},
            "loss_buffer": loss_buffer_init(buffer_steps, device),
            "iteration": torch.zeros((), dtype=torch.int32, device=device),
            "num_steps": torch.tensor(int(num_steps), dtype=torch.int32, device=device),
        }

    def _decays(self, which: tuple[float, ...], device: torch.device) -> Tensor:
        return _constant(tuple(float(w) for w in which), device)

    def lstm_inputs(self, params: Params, state: LOptState, loss_features: Tensor,
                    p_mean_sq: Mapping[str, Tensor] | None = None,
                    moments: Mapping[str, tuple[Tensor, ...]] | None = None) -> Tensor:
        """The (n_tensors, 30) RNN input, from the *old* parameters and accumulators
        (``p_mean_sq``: each tensor's ``mean(p²)`` when the caller has it already;
        ``moments``: per tensor ``(var_m, mean_m, var_rms, mean_rms)`` of the old
        accumulators, as the fused kernel's first pass returns them)."""
        msq, var_m, mean_m, var_r, mean_r = [], [], [], [], []
        for key, p in params.items():
            msq.append(p_mean_sq[key] if p_mean_sq is not None else _mean_sq(p))
            if moments is not None and key in moments:
                vm, mm, vr, mr = moments[key]
            else:
                vm, mm = _var_mean(state["mom"][key].movedim(-1, 0).reshape(3, -1))
                vr, mr = _var_mean(state["rms"][key].reshape(1, -1))
            var_m.append(vm)
            mean_m.append(mm)
            var_r.append(vr.reshape(1))
            mean_r.append(mr.reshape(1))
        return self._lstm_features(
            [p.shape for p in params.values()], state, loss_features, torch.stack(msq),
            torch.stack(var_m), torch.stack(mean_m), torch.stack(var_r), torch.stack(mean_r))

    def _lstm_features(self, shapes: Sequence[Sequence[int]], state: LOptState,
                       loss_features: Tensor, msq: Tensor, var_m: Tensor, mean_m: Tensor,
                       var_r: Tensor, mean_r: Tensor) -> Tensor:
        """The (n_tensors, 30) RNN input from each tensor's ``mean(p²)`` (n,), the old
        momenta's variance and mean (n, 3) and the old second moment's (n, 1)."""
        device = state["iteration"].device
        fraction = state["iteration"].to(torch.float32) / state["num_steps"].to(torch.float32)
        fraction_left = torch.tanh((fraction - _constant(_FRACTION_TIMESCALES, device)) * 10.0)
        norm_mult = torch.rsqrt(torch.clamp(msq, min=1e-9)).unsqueeze(1)
        nm2 = norm_mult * norm_mult
        # var(a·x) = a² var(x); the reference's mean((r - mean_m)²) = var(r) + (mean(r) - mean_m)²
        var_m_n, mean_m_n = var_m * nm2, mean_m * norm_mult
        mean_rms = mean_r * norm_mult
        var_rms = var_r * nm2 + torch.square(mean_rms - mean_m_n)
        # the three log features in one elementwise pass: (n, 1 + 3 + 1)
        logs = _clip_log_abs(torch.cat([mean_rms, var_m_n, var_rms], dim=1))
        # [fraction_left, loss_features | log mean_rms, rank one-hot, logs of variances],
        # the shared features broadcast to every tensor, in one concatenation
        n = logs.shape[0]
        return torch.cat([fraction_left.expand(n, -1), loss_features.expand(n, -1),
                          logs[:, :1], _rank_features(shapes, device), logs[:, 1:]], dim=1)

    def derived_meta_parameters(self) -> dict[str, Tensor]:
        """Detached snapshot of the step's networks, pre-arranged for the shell's fast path.

        ``lstm_fold = (W_ih @ W_mix_in)ᵀ`` (``mix_in`` folded into the LSTM's input
        weights, so the (n, 512) @ (512, 2048) input product becomes a (n, 30) @ (30, 2048)
        one), ``lstm_bias = W_ih b_mix_in + b_ih + b_hh``; the LSTM (``gates_pool`` = W_ih,
        ``gates_h`` = W_hhᵀ), ``mix_pool`` and output weights as copies in the layout the
        products stream best (contiguous ``(in, out)``), the gate rows in the order
        (i, f, o, g) so one sigmoid covers three gates, ``head_w``/``head_b`` the
        controls and the step-size layer side by side (one product gives both); and
        ``packed_mlps``: the stack of per-parameter MLPs already
        gathered into the fused kernel's argument layout and scaled by
        ``100 / param_inits`` (``controls @ packed_mlps`` is every tensor's packed row).
        Equal to the module path up to float32 rounding (re-association). The torch.optim
        shell builds it once (see
        :meth:`~metaopt.lopt.torch_optimizer.LearnedOptimizerShell.refresh_meta_parameters`);
        the pure :meth:`update` never uses it.
        """
        h = self.lstm_hidden_size
        # gate rows reordered (i, f, g, o) -> (i, f, o, g): one sigmoid over 3h columns
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h),
                           torch.arange(2 * h, 3 * h)])
        with torch.no_grad():
            w_ih = self.lstm.weight_ih.detach()
            head_w = torch.cat([self.rnn_to_controls.weight.detach(),
                                self.step_size.weight.detach()], 0)
            meta = {
                # (in, out) copies, contiguous: the GEMMs stream the weights row by row
                "gates_pool": w_ih[order].contiguous(),
                "gates_h": self.lstm.weight_hh.detach()[order].T.contiguous(),
                "pool_w": self.mix_pool.weight.detach().T.contiguous(),
                "pool_b": self.mix_pool.bias.detach().clone(),
                "head_w": head_w.T.contiguous(),
                "head_b": torch.cat([self.rnn_to_controls.bias.detach(),
                                     self.step_size.bias.detach()]),
                "flat_mlps": self._flat_mlps().detach().clone(),
            }
            if self.mix_layers:
                meta["lstm_fold"] = (w_ih @ self.mix_in.weight.detach())[order].T.contiguous()
                meta["lstm_bias"] = (torch.mv(w_ih, self.mix_in.bias.detach())
                                     + self.lstm.bias_ih.detach()
                                     + self.lstm.bias_hh.detach())[order]
            if velo_kernels.gather_supported(self):
                # the LSTM weights as the kernels' column panels (rnn(..., kern))
                meta["gates_h_panels"] = cpu_kernels.gate_panels(meta["gates_h"])
                meta["gates_pool_panels"] = cpu_kernels.gate_panels(meta["gates_pool"].T)
                first, second, _, _ = self._kernel_gather()
                flat = meta["flat_mlps"]
                ext = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
                meta["packed_mlps"] = ((torch.index_select(ext, 1, first.to(flat.device))
                                        + torch.index_select(ext, 1, second.to(flat.device)))
                                       * (100.0 / self.param_inits))
        return meta

    def rnn(self, x: Tensor, hidden: Tensor, cell: Tensor,
            meta: Mapping[str, Tensor] | None = None,
            kern: cpu_kernels.LoptCpuKernels | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-tensor network: ``(controls, lr_mult, next_hidden, next_cell)``.

        With ``meta`` (:meth:`derived_meta_parameters`, the shell's snapshot) the
        network runs on those tensors, with ``mix_in`` folded into the LSTM:
        ``W_ih (A x + b + pooled) + b_ih + b_hh = (W_ih A) x + W_ih pooled + (W_ih b +
        b_ih + b_hh)``; with ``kern`` as well, the pooling and the gate products run as one
        :meth:`~metaopt.lopt.cpu_kernels.LoptCpuKernels.velo_gates` call on the snapshot's
        weight panels (equal up to float32 rounding). Without ``meta``, on the module's
        parameters (differentiable)."""
        if meta is not None and self.mix_layers:
            hid = hidden.shape[1]
            if kern is not None and "gates_h_panels" in meta:
                gates = kern.velo_gates(x, hidden, meta["pool_w"], meta["pool_b"],
                                        meta["lstm_fold"], meta["lstm_bias"],
                                        meta["gates_h_panels"], meta["gates_pool_panels"])
            else:
                pooled = torch.relu(torch.addmm(meta["pool_b"], x, meta["pool_w"])).amax(dim=0)
                gates = torch.addmm(torch.addmv(meta["lstm_bias"], meta["gates_pool"], pooled),
                                    x, meta["lstm_fold"])
                gates = torch.addmm(gates, hidden, meta["gates_h"])
            ifo = torch.sigmoid(gates[:, :3 * hid])
            c = torch.addcmul(ifo[:, hid:2 * hid] * cell, ifo[:, :hid],
                              torch.tanh(gates[:, 3 * hid:]))
            h = ifo[:, 2 * hid:] * torch.tanh(c)
            head = torch.addmm(meta["head_b"], h, meta["head_w"])
            return head[:, :-1], head[:, -1], h, c
        if self.mix_layers:
            # The reference computes relu(linear(x)) here and overwrites it (dead weights).
            pooled = torch.relu(self.mix_pool(x)).amax(dim=0, keepdim=True)
            x = self.mix_in(x) + pooled
        h, c = self.lstm(x, (hidden, cell))
        return self.rnn_to_controls(h), self.step_size(h).squeeze(-1), h, c

    def _flat_mlps(self) -> Tensor:
        """The stack of per-parameter MLPs as (param_inits, n_weights) rows
        ``[W0, b0, W1, b1, W2, b2]``."""
        blocks = [t for pair in zip(self.ff_weights, self.ff_biases) for t in pair]
        return torch.cat([t.reshape(self.param_inits, -1) for t in blocks], 1)

    def _mixed_flat(self, controls: Tensor, meta: Mapping[str, Tensor] | None = None
                    ) -> Tensor:
        """Per tensor, the MLP ``100 * mean_k(copy_k * controls_k)`` as one flat row
        ``[W0, b0, W1, b1, W2, b2]`` (n_tensors, n_weights)."""
        flat = meta["flat_mlps"] if meta is not None else self._flat_mlps()
        return (controls @ flat) * (100.0 / self.param_inits)

    def _kernel_gather(self) -> tuple[Tensor, Tensor, Any, Any]:
        """:func:`~metaopt.lopt.velo_kernels.kernel_mlp_gather` for this VeLO's sizes."""
        return velo_kernels.kernel_mlp_gather(
            _N_FF_IN, self.ff_hidden_size, self.ff_weights[-1].shape[-1],
            len(self.initial_momentum_decays), _FULL_CHANNELS_T, _ROW_CHANNELS_T,
            _COL_CHANNELS_T)

    def _mixed_mlps(self, controls: Tensor, mixed: Tensor | None = None
                    ) -> list[list[Tensor]]:
        """Per tensor, the MLP ``100 * mean_k(copy_k * controls_k)``: [[W0, b0, W1, ...]]."""
        blocks = [t for pair in zip(self.ff_weights, self.ff_biases) for t in pair]
        if mixed is None:
            mixed = self._mixed_flat(controls)
        out = []
        for row in mixed:
            parts, i = [], 0
            for t in blocks:
                n = t[0].numel()
                parts.append(row[i:i + n].reshape(t.shape[1:]))
                i += n
            out.append(parts)
        return out

    def _update(self, grads: Params, state: LOptState, params: Params, loss: Tensor | None,
                backend: cpu_kernels.LoptCpuKernels | None) -> tuple[Params, LOptState]:
        new_params, new_state, _ = self._step(grads, state, params, loss, backend)
        return new_params, new_state

    def _update_(self, grads: Params, state: LOptState, params: Params, loss: Tensor | None,
                 lr: Mapping[str, float], weight_decay: Mapping[str, float],
                 backend: cpu_kernels.LoptCpuKernels | None, workspace: dict | None
                 ) -> LOptState:
        """In-place step: with the kernels, float32 CPU tensors are written in place (and
        their accumulators into the old buffers, through plans kept in ``workspace``)."""
        _, new_state, _ = self._step(grads, state, params, loss, backend,
                                     inplace=(lr, weight_decay), workspace=workspace)
        return new_state

    def update_with_internals(self, grads: Params, state: LOptState, params: Params,
                              loss: Tensor | float | None = None
                              ) -> tuple[Params, LOptState, dict[str, Tensor]]:
        """:meth:`update` (reference backend) plus the internals (LSTM input, controls,
        lr_mult, loss features)."""
        checked = self._guard(grads, state, params, loss, "raise")
        return self._step(grads, state, params, checked[1], None)

    def _update_scales(self, state: LOptState, keys: list[str]) -> list[Tensor | float]:
        """Extra per-tensor step multiplier (1 for VeLO; μP scales for μLO)."""
        return [1.0] * len(keys)

    def _step(self, grads: Params, state: LOptState, params: Params, loss: Tensor,
              kern: cpu_kernels.LoptCpuKernels | None,
              inplace: tuple[Mapping[str, float], Mapping[str, float]] | None = None,
              workspace: dict | None = None
              ) -> tuple[Params, LOptState, dict[str, Tensor]]:
        """One step on checked inputs. Per tensor: kernel pass 1 or the reference
        accumulators; the shared LSTM; kernel pass 2 or :meth:`_tensor_step`."""
        keys = list(params.keys())
        device = state["iteration"].device
        loss_t = loss.to(device=device, dtype=torch.float32)
        mom_d = self._decays(self.initial_momentum_decays, device)
        rms_d = self._decays(tuple(min(max(d, 0.0), 1.0) for d in self.initial_rms_decays),
                             device)
        fac_d = self._decays(tuple(min(max(d, 0.0), 1.0)
                                   for d in self.initial_adafactor_decays), device)
        rms_float = min(max(self.initial_rms_decays[0], 0.0), 1.0)
        # the shell's snapshot of the networks (never under autograd, never in update())
        meta = (workspace.get("meta") if workspace is not None and not torch.is_grad_enabled()
                else None)
        if kern is not None and (not velo_kernels.supports(self, kern) or (
                torch.is_grad_enabled() and self._needs_graph(grads, state, params))):
            kern = None  # the kernels never run where an autograd graph is needed
        # Fused kernel, first half: accumulators and the old state's moments (no LSTM yet).
        # The kernel clips gradients itself; the reference path clips here.
        # In-place steps of planned tensors run batched (one C call per pass for all).
        kernel: dict[str, dict[str, Any]] = {}
        planned: list[tuple[int, str, Any]] = []
        for j, key in enumerate(keys) if kern is not None else ():
            p, g = params[key], grads[key]
            if not velo_kernels.kernel_ok(p, g):
                continue
            plan = (velo_kernels.plan_for(self, kern, workspace, key, p, state)
                    if inplace is not None and workspace is not None and g.is_contiguous()
                    else None)
            if plan is not None:
                planned.append((j, key, plan))
                kernel[key] = {"plan": plan, "stats": plan.stats, "n": plan.n}
            else:
                kernel[key] = velo_kernels.pass1(self, kern, p, g, state, key, mom_d, rms_d,
                                                 fac_d, inplace is not None)
        batch = None
        if planned:
            batch = velo_kernels.batch_for(
                kern, workspace, tuple(plan for _, _, plan in planned),
                tuple(j for j, _, _ in planned), self._kernel_gather()[2:])
            batch.pass1([grads[key] for _, key, _ in planned], mom_d, rms_float, fac_d)
        grads = {k: g if k in kernel else torch.clamp(g.to(torch.float32), -1000.0, 1000.0)
                 for k, g in grads.items()}

        # Per-tensor LSTM over all tensors at once.
        k_dec = len(self.initial_momentum_decays)
        if kernel and len(kernel) == len(keys):
            # every tensor went through the kernel: its sums give the loss buffer, all
            # moments and the LSTM input in one call
            next_buffer, loss_features, x, msq = velo_kernels.scalars(
                kern, state, loss_t, [kernel[k] for k in keys],
                _constant(_FRACTION_TIMESCALES, device),
                _rank_features([p.shape for p in params.values()], device))
        else:
            next_buffer, loss_features = loss_buffer_step(state["loss_buffer"], loss_t)
            for pre in kernel.values():
                msq1, var_m1, mean_m1, var_r1, mean_r1 = velo_kernels.kernel_moments(k_dec,
                                                                                      [pre])
                pre["p_mean_sq"] = msq1[0]
                pre["moments"] = (var_m1[0], mean_m1[0], var_r1[0], mean_r1[0])
            p_mean_sq = {k: kernel[k]["p_mean_sq"] if k in kernel else _mean_sq(p)
                         for k, p in params.items()}
            msq = torch.stack(list(p_mean_sq.values())) if kernel else None
            x = self.lstm_inputs(params, state, loss_features, p_mean_sq,
                                 {k: pre["moments"] for k, pre in kernel.items()})
        h_prev = torch.stack([state["lstm_hidden"][k] for k in keys])
        c_prev = torch.stack([state["lstm_cell"][k] for k in keys])
        controls, lr_mult, h, c = self.rnn(x, h_prev, c_prev, meta, kern)
        internals = {"lstm_input": x, "controls": controls, "lr_mult": lr_mult,
                     "loss_features": loss_features, "next_lstm_hidden": h,
                     "next_lstm_cell": c}
        if self.use_bugged_next_lstm_state:
            h, c = h_prev, c_prev
        if self.rnn_state_decay > 0.0:
            h, c = h * (1.0 - self.rnn_state_decay), c * (1.0 - self.rnn_state_decay)
        packed_mlps = meta.get("packed_mlps") if meta is not None else None
        mixed = (self._mixed_flat(controls, meta)
                 if len(kernel) < len(keys) or packed_mlps is None else None)
        mlps = self._mixed_mlps(controls, mixed) if len(kernel) < len(keys) else None
        scales = self._update_scales(state, keys)
        if kernel:
            # the kernel's MLP arguments of every tensor in one product (or gather), and
            # the step coefficients as Python floats in one conversion
            first, second, *slots = self._kernel_gather()
            if packed_mlps is not None:
                packed = controls @ packed_mlps
            else:
                ext = torch.cat([mixed, mixed.new_zeros(mixed.shape[0], 1)], dim=1)
                packed = torch.index_select(ext, 1, first) + torch.index_select(ext, 1, second)
            coef_floats = [lm * self.step_mult for lm in lr_mult.tolist()]
            if self.param_scale_mult:
                coef_floats = [cf * math.sqrt(ms + 1e-9)
                               for cf, ms in zip(coef_floats, msq.tolist())]
            if not all(isinstance(sc, float) and sc == 1.0 for sc in scales):
                coef_floats = [cf * float(sc) for cf, sc in zip(coef_floats, scales)]

        if batch is not None:
            lrs = [inplace[0].get(key, 1.0) for _, key, _ in planned]
            batch.pass2(packed, [coef_floats[j] * lr for (j, _, _), lr in zip(planned, lrs)],
                        [1.0 - lr * inplace[1].get(key, 0.0)
                         for (_, key, _), lr in zip(planned, lrs)], self.exp_mult)
        new_params: Params = {}
        mom, rms, v_row, v_col, v_diag = {}, {}, {}, {}, {}
        for j, key in enumerate(keys):
            p, g = params[key], grads[key]
            if key in kernel:
                lr, wd = ((inplace[0].get(key, 1.0), inplace[1].get(key, 0.0))
                          if inplace is not None else (1.0, 0.0))
                if "plan" in kernel[key]:  # stepped in place by the batch above
                    new_params[key] = p
                    for group, out in (("mom", mom), ("rms", rms), ("v_row", v_row),
                                       ("v_col", v_col), ("v_diag", v_diag)):
                        out[key] = state[group][key]
                    continue
                new_params[key], mom[key], rms[key], v_row[key], v_col[key], vd = \
                    velo_kernels.pass2(self, kern, kernel[key], p, packed[j],
                                       slots[p.dim() == 1], coef_floats[j] * lr,
                                       1.0 - lr * wd, inplace is not None)
                v_diag[key] = state["v_diag"][key] if vd is None else vd
                continue
            info = self._info(p.shape)
            m_new = mom_d * state["mom"][key] + (1.0 - mom_d) * g.unsqueeze(-1)
            r_new = rms_d * state["rms"][key] + (1.0 - rms_d) * (g * g).unsqueeze(-1)
            mom[key], rms[key] = m_new, r_new
            step, vr, vc, vd = self._tensor_step(
                info, p.to(torch.float32).reshape(info.shape1d), g.reshape(info.shape1d),
                m_new.reshape(*info.shape1d, 3), r_new.reshape(*info.shape1d, 1),
                state["v_row"][key], state["v_col"][key],
                state["v_diag"][key].reshape(*info.shape1d, 3)
                if info.factored is None else state["v_diag"][key],
                fac_d, mlps[j])
            v_row[key], v_col[key] = vr, vc
            v_diag[key] = vd.reshape(*info.shape, 3) if info.factored is None else vd
            step = lr_mult[j] * step
            if not (isinstance(scales[j], float) and scales[j] == 1.0):
                step = step * scales[j]
            new_params[key] = (p - step.reshape(info.shape).to(p.dtype))
            if inplace is not None:
                apply_step_(p, new_params[key], inplace[0].get(key, 1.0),
                            inplace[1].get(key, 0.0))
                new_params[key] = p
        new_state = {
            "mom": mom, "rms": rms, "v_row": v_row, "v_col": v_col, "v_diag": v_diag,
            "lstm_hidden": dict(zip(keys, h.unbind(0))),
            "lstm_cell": dict(zip(keys, c.unbind(0))), "loss_buffer": next_buffer,
            "iteration": state["iteration"] + 1, "num_steps": state["num_steps"],
        }
        for extra in state.keys() - new_state.keys():
            new_state[extra] = state[extra]
        return new_params, new_state, internals

    def _needs_graph(self, *trees: Any) -> bool:
        """Whether any task tensor, state tensor or meta-parameter requires grad."""
        return (any(t.requires_grad for tree in trees for t in tree_leaves(tree)[1])
                or any(t.requires_grad for t in self.parameters()))


    def _tensor_step(self, info: _TensorInfo, p: Tensor, g: Tensor, m: Tensor, rms: Tensor,
                     v_row: Tensor, v_col: Tensor, v_diag: Tensor, fac_d: Tensor,
                     mlp: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Adafactor statistics and the mixed MLP for one tensor: (step without lr_mult, ...).

        The step is ``direction * rms(p) * exp(exp_mult * magnitude) * step_mult``.
        """
        g2 = (g * g + 1e-30).unsqueeze(-1)
        rsqrt = torch.rsqrt(rms + 1e-6)
        w0, b0 = mlp[0], mlp[1]
        if info.factored is not None:
            d1, d0 = info.factored
            v_row = fac_d * v_row + (1.0 - fac_d) * g2.mean(dim=d0)
            v_col = fac_d * v_col + (1.0 - fac_d) * g2.mean(dim=d1)
            reduced_d1 = d1 - 1 if d1 > d0 else d1
            row_col_mean = v_row.mean(dim=reduced_d1, keepdim=True)
            row_factor = _safe_rsqrt(v_row / (row_col_mean + 1e-9)).unsqueeze(d0)
            col_factor = _safe_rsqrt(v_col).unsqueeze(d1)
            fac_g = g.unsqueeze(-1) * row_factor * col_factor
            fac_mom = m * row_factor * col_factor
            full = [g.unsqueeze(-1), torch.clamp(g, -0.1, 0.1).unsqueeze(-1), p.unsqueeze(-1),
                    m, rms, m * rsqrt, rsqrt, fac_g, g.unsqueeze(-1) * rsqrt, fac_mom]
            x = torch.cat(full, dim=-1).reshape(-1, len(_FULL_CHANNELS))
            w_full = w0[_FULL_CHANNELS]
            # Row/column statistics are constant along d0/d1: push them through the first
            # layer on the reduced arrays (their mean square over the tensor is the same).
            row_in = torch.cat([v_row, torch.rsqrt(v_row + 1e-8)], dim=-1)
            col_in = torch.cat([v_col, torch.rsqrt(v_col + 1e-8)], dim=-1)
            row_h = self._normalised_matmul(row_in, w0[_ROW_CHANNELS])
            col_h = self._normalised_matmul(col_in, w0[_COL_CHANNELS])
            h = self._normalised_matmul(x, w_full).reshape(*info.shape1d, -1)
            h = h + row_h.unsqueeze(d0) + col_h.unsqueeze(d1)
            h = h.reshape(-1, h.shape[-1])
            v_out = (v_row, v_col, v_diag)
        else:
            v_diag = fac_d * v_diag + (1.0 - fac_d) * g2
            fac_g = g.unsqueeze(-1) * _safe_rsqrt(v_diag + 1e-9)
            fac_mom = m * torch.pow(v_diag, -0.5)
            rsq_v = torch.rsqrt(v_diag + 1e-8)
            full = [g.unsqueeze(-1), torch.clamp(g, -0.1, 0.1).unsqueeze(-1), p.unsqueeze(-1),
                    m, rms, m * rsqrt, rsqrt, fac_g, g.unsqueeze(-1) * rsqrt,
                    v_diag, rsq_v, fac_mom]
            x = torch.cat(full, dim=-1).reshape(-1, len(_FULL_CHANNELS) + 6)
            # Groups 9/10 (and 11/12) are the same input: sum their weights.
            w_v = w0[_ROW_CHANNELS] + w0[_COL_CHANNELS]
            w_full = torch.cat([w0[_FULL_CHANNELS[:-3]], w_v, w0[_FULL_CHANNELS[-3:]]], 0)
            h = self._normalised_matmul(x, w_full)
            v_out = (v_row, v_col, v_diag)
        h = torch.relu(h + b0)
        n_layers = len(mlp) // 2
        for li in range(1, n_layers):
            w, b = mlp[2 * li], mlp[2 * li + 1]
            if li == n_layers - 1:
                h = torch.addmm(b[:2], h, w[:, :2])
            else:
                h = torch.relu(torch.addmm(b, h, w))
        direction, magnitude = h[:, 0], h[:, 1]
        step = direction * torch.exp(magnitude * self.exp_mult)
        if self.param_scale_mult:
            step = step * torch.sqrt(torch.mean(p * p) + 1e-9)
        step = step * self.step_mult
        return step, *v_out

    @staticmethod
    def _normalised_matmul(x: Tensor, w: Tensor) -> Tensor:
        """``(x * rsqrt(1e-5 + mean(x², all but last axis))) @ w``, scale folded into ``w``."""
        x2 = x.reshape(-1, x.shape[-1])
        scale = torch.rsqrt(1e-5 + torch.mean(x2 * x2, dim=0))
        return (x2 @ (scale.unsqueeze(1) * w)).reshape(*x.shape[:-1], w.shape[1])

