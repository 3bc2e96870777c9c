"""small_fc_lopt: a per-parameter MLP over Adafactor-style features (AdafacMLPLOpt).

Port of learned_optimization's ``AdafacMLPLOpt``. For every element of every task
tensor, a tiny MLP (39 → 4 → 4 → 2, relu) reads

* 28 normalised features: ``g, p, m(3), rms(1), m·rsqrt(rms+1e-6)(3), rsqrt(rms+1e-6)(1),
  fac_g(3)`` followed by the factored second-moment group (5 × 3, see :meth:`_features`),
  each channel scaled by ``rsqrt(1e-5 + mean(x²))`` over the tensor;
* 11 un-normalised step embeddings ``tanh(iteration / c - 1)``;

and proposes ``step = direction · exp(0.001 · magnitude) · 0.001``; ``p ← p − step``.
The accumulator decays are meta-learned: ``decay = 1 − (1 − base) · exp(10 · offset)``.
The loss is not used.

Meta-parameters keep the reference's layout: first-layer weight ``w0`` is (in, out),
applied as ``x @ w0 + b0`` (the transpose of ``nn.Linear.weight``). Implementation note:
the per-channel normalisation is folded into the first-layer weights (``(x·s) @ W =
x @ (s·W)``), so the normalised feature matrix is never materialised.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.lopt import cpu_kernels
from metaopt.lopt import features as F
from metaopt.lopt.base import LearnedOptimizer, LOptState, apply_step_, register_architecture
from metaopt.params import Params

__all__ = ["SmallFCLOpt"]

_ACCUMULATORS = ("m", "rms", "v_row", "v_col", "v_diag")


@register_architecture
class SmallFCLOpt(LearnedOptimizer):
    """Per-parameter MLP learned optimizer with meta-learned accumulator decays.

    Args:
        exp_mult, step_mult: scale of ``magnitude`` in the exponent and of the step.
        hidden_size, hidden_layers: MLP shape (reference defaults 4 and 2).
        initial_momentum_decays, initial_rms_decays, initial_adafactor_decays: the
            base decays the meta-learned offsets are relative to.
    """

    architecture = "small_fc_lopt"
    needs_loss = False
    release_names = ("AdafacMLPLOpt",)

    def __init__(self, exp_mult: float = 0.001, step_mult: float = 0.001,
                 hidden_size: int = 4, hidden_layers: int = 2,
                 initial_momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
                 initial_rms_decays: Sequence[float] = (0.999,),
                 initial_adafactor_decays: Sequence[float] = (0.9, 0.99, 0.999)) -> None:
        super().__init__()
        n_mom, n_rms, n_fac = (len(initial_momentum_decays), len(initial_rms_decays),
                               len(initial_adafactor_decays))
        if n_mom != n_fac and 1 not in (n_mom, n_fac):
            raise ValueError("momentum and adafactor decays must broadcast (same count or 1)")
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        self.hidden_size = int(hidden_size)
        self.hidden_layers = int(hidden_layers)
        self.initial_momentum_decays = tuple(float(d) for d in initial_momentum_decays)
        self.initial_rms_decays = tuple(float(d) for d in initial_rms_decays)
        self.initial_adafactor_decays = tuple(float(d) for d in initial_adafactor_decays)
        self.momentum_decays = nn.Parameter(torch.zeros(n_mom))
        self.rms_decays = nn.Parameter(torch.zeros(n_rms))
        self.adafactor_decays = nn.Parameter(torch.zeros(n_fac))
        self.n_features = self.feature_count(n_mom, n_rms, n_fac)
        sizes = [self.n_features + len(F.TIME_SCALES)]
        sizes += [self.hidden_size] * self.hidden_layers + [2]
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            w = torch.empty(fan_in, fan_out)
            std = 1.0 / math.sqrt(fan_in)
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)  # haiku TruncatedNormal
            self.register_parameter(f"w{i}", nn.Parameter(w))
            self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(fan_out)))
        self.n_layers = len(sizes) - 1

    # ------------------------------------------------------------------ description
    @staticmethod
    def feature_count(n_mom: int, n_rms: int, n_fac: int) -> int:
        """Number of normalised input channels (28 for decays (3, 1, 3))."""
        n_mult = max(n_mom, n_fac)
        return 2 + n_mom + n_rms + max(n_mom, n_rms) + n_rms + n_fac + 4 * n_fac + n_mult

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able)."""
        return {"exp_mult": self.exp_mult, "step_mult": self.step_mult,
                "hidden_size": self.hidden_size, "hidden_layers": self.hidden_layers,
                "initial_momentum_decays": list(self.initial_momentum_decays),
                "initial_rms_decays": list(self.initial_rms_decays),
                "initial_adafactor_decays": list(self.initial_adafactor_decays)}

    # ------------------------------------------------------------------ release import
    @classmethod
    def from_release(cls, tree: Mapping[str, Any], bindings: Mapping[str, Any]) -> SmallFCLOpt:
        """Build from a learned_optimization ``AdafacMLPLOpt`` theta tree + gin bindings
        (see :func:`metaopt.lopt.release_arch.small_fc_from_release`)."""
        from metaopt.lopt.release_arch import small_fc_from_release

        return small_fc_from_release(cls, tree, bindings)

    # ------------------------------------------------------------------ functional core
    def decays(self) -> tuple[Tensor, Tensor, Tensor]:
        """Meta-learned (momentum, rms, adafactor) decays."""
        return (F.decays_from_offsets(self.initial_momentum_decays, self.momentum_decays),
                F.decays_from_offsets(self.initial_rms_decays, self.rms_decays),
                F.decays_from_offsets(self.initial_adafactor_decays, self.adafactor_decays))

    def init(self, params: Params, num_steps: int) -> LOptState:
        """Zero accumulators (in each parameter's dtype/device) and iteration 0.

        State: ``{"iteration": int32 0-d tensor, "num_steps": int, "m": {name: ...},
        "rms": {...}, "v_row": {...}, "v_col": {...}, "v_diag": {...}}``. Accumulators
        hold the reference's values with the decay index **first** (``m[name]`` has shape
        ``(3,) + p.shape``; learned_optimization puts it last): each decay's slice is
        contiguous, which keeps the per-element work vectorised.
        """
        n = (len(self.initial_momentum_decays), len(self.initial_rms_decays),
             len(self.initial_adafactor_decays))
        state: LOptState = {k: {} for k in _ACCUMULATORS}
        device = next(iter(params.values())).device if params else torch.device("cpu")
        for name, p in params.items():
            for key, value in F.init_accumulators(p.detach(), *n, decay_first=True).items():
                state[key][name] = value
        state["iteration"] = torch.zeros((), dtype=torch.int32, device=device)
        state["num_steps"] = int(num_steps)
        return state

    def update(self, grads: Params, state: LOptState, params: Params,
               loss: Tensor | None = None) -> tuple[Params, LOptState]:
        """One step for every tensor; pure (returns new params and a new state)."""
        del loss  # small_fc_lopt does not look at the loss
        return self._step(grads, state, params, None)

    def update_(self, grads: Params, state: LOptState, params: Params,
                loss: Tensor | None = None, *, lr: Mapping[str, float] | None = None,
                weight_decay: Mapping[str, float] | None = None) -> LOptState:
        """In-place step (see :meth:`LearnedOptimizer.update_`): float32 CPU matrices go
        through the fused kernel, which writes into the parameters and the accumulators."""
        del loss
        _, new_state = self._step(grads, state, params, (lr or {}, weight_decay or {}))
        return new_state

    def _step(self, grads: Params, state: LOptState, params: Params,
              inplace: tuple[Mapping[str, float], Mapping[str, float]] | None
              ) -> tuple[Params, LOptState]:
        """Shared loop of :meth:`update` and (``inplace=(lr, weight_decay)``) :meth:`update_`."""
        iteration = state["iteration"]
        new_state: LOptState = {k: {} for k in _ACCUMULATORS}
        new_params: Params = {}
        cache: dict[tuple[torch.dtype, torch.device], tuple] = {}
        kernel_const: dict[str, Any] | None = None
        for name, p in params.items():
            g = grads[name]
            key = (_compute_dtype(p.dtype), p.device)
            if key not in cache:
                cache[key] = self._prepare(iteration, *key)
            acc = {k: state[k][name] for k in _ACCUMULATORS}
            scale = self._step_scale(state, name)
            kernel = self._kernel_ok(p, g, acc)
            if kernel and kernel_const is None:  # float32 CPU only: one set per step
                kernel_const = self._kernel_constants(*cache[key])
            if inplace is not None and kernel:
                lr, wd = inplace[0].get(name, 1.0), inplace[1].get(name, 0.0)
                new_p, new_acc = self._kernel_update_tensor(p, g, acc, kernel_const,
                                                            inplace=(lr, wd), scale=float(scale))
            else:
                if kernel:
                    new_p, new_acc = self._kernel_update_tensor(p, g, acc, kernel_const,
                                                                scale=float(scale))
                else:
                    if self._fast_ok(p, g, acc):
                        new_p, new_acc = self._fast_update_tensor(p, g, acc, *cache[key])
                    else:
                        new_p, new_acc = self._update_tensor(p, g, acc, *cache[key])
                    if not (isinstance(scale, float) and scale == 1.0):
                        # p - p_new is exact in float32 (Sterbenz): one more rounding only
                        new_p = p - scale.to(p.dtype) * (p - new_p)
                if inplace is not None:
                    apply_step_(p, new_p, inplace[0].get(name, 1.0), inplace[1].get(name, 0.0))
                    new_p = p
            new_params[name] = new_p
            for k, v in new_acc.items():
                new_state[k][name] = v
        new_state["iteration"] = iteration + 1
        new_state["num_steps"] = state["num_steps"]
        for extra in state.keys() - new_state.keys():  # e.g. μLO's per-tensor scales
            new_state[extra] = state[extra]
        return new_params, new_state

    def _step_scale(self, state: LOptState, name: str) -> Tensor | float:
        """Extra multiplier of tensor ``name``'s step (1 here; μLO's μP scale)."""
        return 1.0

    def _prepare(self, iteration: Tensor, dtype: torch.dtype, device: torch.device) -> tuple:
        """Decays, MLP weights and the (constant per step) time-feature bias of layer 0."""
        decays = tuple(d.to(dtype=dtype, device=device) for d in self.decays())
        weights = [getattr(self, f"w{i}").to(dtype=dtype, device=device)
                   for i in range(self.n_layers)]
        biases = [getattr(self, f"b{i}").to(dtype=dtype, device=device)
                  for i in range(self.n_layers)]
        time = F.tanh_time_embedding(iteration.to(device), dtype=torch.float32).to(dtype)
        w0_feat, w0_time = weights[0][: self.n_features], weights[0][self.n_features:]
        bias0 = time @ w0_time + biases[0]
        return decays, w0_feat, bias0, weights[1:], biases[1:]

    def _feature_block(self, sl: slice, g: Tensor, p: Tensor, m: Tensor, rms: Tensor,
                       fac_g: Tensor, fac: tuple) -> Tensor:
        """Raw (un-normalised) input channels of the elements ``[sl]`` along tensor axis 0,
        as a (C, n_block) matrix in the reference's channel order.

        Accumulators are decay-first; ``fac`` holds the factored second-moment inputs as
        broadcast *views* (row, col, their rsqrt, row/col factors) or ``v_diag``.
        """
        m_b, rms_b = m[:, sl], rms[:, sl]
        rsqrt = torch.rsqrt(rms_b + 1e-6)
        groups = [g[sl].unsqueeze(0), p[sl].unsqueeze(0), m_b, rms_b, m_b * rsqrt, rsqrt,
                  fac_g[:, sl]]
        if fac[0] == "factored":
            _, row, col, rsqrt_row, rsqrt_col, row_factor, col_factor = fac
            groups += [row[:, sl], col[:, sl], rsqrt_row[:, sl], rsqrt_col[:, sl],
                       m_b * row_factor[:, sl] * col_factor[:, sl]]
        else:
            v = fac[1][:, sl]
            r = torch.rsqrt(v + 1e-8)
            groups += [v, v, r, r, m_b * (v + 1e-6) ** -0.5]
        shape = g[sl].shape
        return torch.cat([x.expand(x.shape[0], *shape).reshape(x.shape[0], -1) for x in groups])

    def _factored_inputs(self, shape: torch.Size, m: Tensor, v_row: Tensor, v_col: Tensor,
                         v_diag: Tensor) -> tuple:
        """Broadcast views of the Adafactor features (computed on the small factors)."""
        dims = F.factored_dims(shape)
        if dims is None:
            return ("diag", v_diag)
        d1, d0 = dims
        rows = lambda v: F.expand_row(v, d0, shape[d0], decay_first=True)  # noqa: E731
        cols = lambda v: F.expand_col(v, d1, shape[d1], decay_first=True)  # noqa: E731
        reduced_d1 = (d1 - 1 if d1 > d0 else d1) + 1
        row_factor = F.safe_rsqrt(v_row / (torch.mean(v_row, dim=reduced_d1, keepdim=True)
                                           + 1e-9))
        col_factor = F.safe_rsqrt(v_col)
        return ("factored", rows(v_row), cols(v_col), rows(torch.rsqrt(v_row + 1e-8)),
                cols(torch.rsqrt(v_col + 1e-8)), rows(row_factor), cols(col_factor))

    def _update_tensor(self, p: Tensor, g: Tensor, acc: dict[str, Tensor], decays: tuple,
                       w0_feat: Tensor, bias0: Tensor, weights: list[Tensor],
                       biases: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out_dtype, shape = p.dtype, p.shape
        dtype = w0_feat.dtype
        work_shape = shape or torch.Size([1])  # 0-d tensors are treated as (1,), as the reference
        p_c, g_c = p.to(dtype).reshape(work_shape), g.to(dtype).reshape(work_shape)
        acc_c = {k: v.to(dtype) for k, v in acc.items()}
        if not shape:
            acc_c = {k: (v.reshape(-1, 1) if k in ("m", "rms", "v_diag") else v)
                     for k, v in acc_c.items()}
        mom_d, rms_d, fac_d = decays
        m = F.update_momentum(acc_c["m"], g_c, mom_d, decay_first=True)
        rms = F.update_rms(acc_c["rms"], g_c, rms_d, decay_first=True)
        v_row, v_col, v_diag, fac_g = F.update_factored(
            acc_c["v_row"], acc_c["v_col"], acc_c["v_diag"], g_c, fac_d, decay_first=True)

        # The MLP runs over blocks of rows (along tensor axis 0) so the (C, block) feature
        # matrix stays in cache; the per-channel second-moment normalisation needs the
        # whole tensor, so a first pass sums squares and the scale is folded into w0.
        fac = self._factored_inputs(work_shape, m, v_row, v_col, v_diag)
        n = p_c.numel()
        rows = work_shape[0]
        per_row = max(1, n // rows)
        block = max(1, _BLOCK_ELEMENTS // per_row)
        slices = [slice(i, min(i + block, rows)) for i in range(0, rows, block)]
        cached = [self._feature_block(sl, g_c, p_c, m, rms, fac_g, fac) for sl in slices] \
            if len(slices) == 1 else None
        sumsq = None
        for i, sl in enumerate(slices):
            xb = cached[i] if cached else self._feature_block(sl, g_c, p_c, m, rms, fac_g, fac)
            part = torch.linalg.vector_norm(xb, dim=1) ** 2
            sumsq = part if sumsq is None else sumsq + part
        scale = torch.rsqrt(1e-5 + sumsq / n)
        w0 = (scale.unsqueeze(-1) * w0_feat).T
        steps = []
        for i, sl in enumerate(slices):
            xb = cached[i] if cached else self._feature_block(sl, g_c, p_c, m, rms, fac_g, fac)
            h = torch.addmm(bias0.unsqueeze(1), w0, xb)
            for w, b in zip(weights, biases):
                h = torch.addmm(b.unsqueeze(1), w.T, torch.relu(h))
            steps.append(h[0] * torch.exp(h[1] * self.exp_mult) * self.step_mult)
        step = steps[0] if len(steps) == 1 else torch.cat(steps)
        new_p = (p_c - step.reshape(work_shape)).reshape(shape).to(out_dtype)

        new_acc = {"m": m, "rms": rms, "v_row": v_row, "v_col": v_col, "v_diag": v_diag}
        if not shape:
            new_acc = {k: (v.reshape(acc[k].shape) if k in ("m", "rms", "v_diag") else v)
                       for k, v in new_acc.items()}
        return new_p, {k: v.to(out_dtype) for k, v in new_acc.items()}

    # ------------------------------------------------------------------ no-grad fast path
    def _fast_ok(self, p: Tensor, g: Tensor, acc: dict[str, Tensor]) -> bool:
        """Whether :meth:`_fast_update_tensor` applies (same math, no autograd).

        It runs when autograd is off (the ``torch.optim`` shell, evaluation) for rank-1/2
        float32/float64 tensors with the default decay counts (one rms decay, as many
        momentum as adafactor decays); everything else takes :meth:`_update_tensor`.
        """
        k = len(self.initial_momentum_decays)
        return (not torch.is_grad_enabled() and p.dim() in (1, 2) and p.numel() > 0
                and p.dtype in (torch.float32, torch.float64) and g.dtype == p.dtype
                and len(self.initial_rms_decays) == 1 and len(self.initial_adafactor_decays) == k
                and all(v.dtype == p.dtype for v in acc.values()))

    def _fast_update_tensor(self, p: Tensor, g: Tensor, acc: dict[str, Tensor], decays: tuple,
                            w0_feat: Tensor, bias0: Tensor, weights: list[Tensor],
                            biases: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`_update_tensor` without autograd, in cache-sized chunks of rows.

        The tensor is viewed as an (a, b) matrix (rank 1: (n, 1)). Only the genuinely
        per-element channels go through the first-layer matmul; the Adafactor row/column
        channels (and the bias) enter as an (H, a) plus an (H, b) term broadcast into
        the hidden pre-activations, and the per-channel normalisation is folded into the
        weights. Pass 0 (factored tensors) reduces g² along both axes; pass 1 writes the
        new accumulators and sums each channel's squares; pass 2 rebuilds the channels
        of a chunk (unless there is only one) and runs the MLP. All big buffers are
        allocated once per tensor; new state tensors are fresh (the update stays pure).
        """
        k = len(self.initial_momentum_decays)
        dtype, shape = p.dtype, p.shape
        a, b = (shape[0], shape[1]) if p.dim() == 2 else (shape[0], 1)
        n = a * b
        g_f, p_f = g.contiguous().view(n), p.contiguous().view(n)
        m_old = acc["m"].contiguous().view(k, n)
        rms_old = acc["rms"].contiguous().view(1, n)
        mom_d, rms_d, fac_d = (d.reshape(-1, 1) for d in decays)
        rms_d = torch.clamp(rms_d, 0.0, 1.0)
        fac_d = torch.clamp(fac_d, 0.0, 1.0)
        mom_c, rms_c, fac_c = 1 - mom_d, 1 - rms_d, 1.0 - fac_d
        dims = F.factored_dims(shape)
        factored = dims is not None
        # channel layout of the per-element matrix X and the matching rows of w0
        i_m, i_rms, i_mr, i_r = 2, 2 + k, 3 + k, 3 + 2 * k
        i_fg = 4 + 2 * k
        ref_rows = list(range(4 + 3 * k))
        if factored:
            n_ch = 4 + 4 * k
            i_mf = 4 + 3 * k
            ref_rows += list(range(4 + 7 * k, 4 + 8 * k))  # mfac
        else:
            n_ch = 4 + 6 * k
            i_v, i_rv, i_mf = 4 + 3 * k, 4 + 4 * k, 4 + 5 * k
            ref_rows += list(range(4 + 7 * k, 4 + 8 * k))  # mfac
        rows_per = max(1, min(a, _BLOCK_ELEMENTS // b))
        chunks = [(r, min(r + rows_per, a)) for r in range(0, a, rows_per)]
        cap = rows_per * b
        xbuf = torch.empty(n_ch * cap, dtype=dtype, device=p.device)
        sbuf = torch.empty(k * cap, dtype=dtype, device=p.device)

        v_row, v_col, v_diag = acc["v_row"], acc["v_col"], acc["v_diag"]
        if factored:
            _, d0 = dims
            row_sum = torch.empty(a, dtype=dtype, device=p.device)
            col_sum = torch.zeros(b, dtype=dtype, device=p.device)
            for r0, r1 in chunks:
                gs = sbuf[: (r1 - r0) * b].view(r1 - r0, b)
                torch.mul(g_f[r0 * b: r1 * b].view(r1 - r0, b), g_f[r0 * b: r1 * b].view(
                    r1 - r0, b), out=gs)
                gs.add_(F.FACTORED_EPS)
                torch.sum(gs, dim=1, out=row_sum[r0:r1])
                col_sum.add_(gs.sum(dim=0))
            mean_ax1, mean_ax0 = row_sum / b, col_sum / a  # index axis 0 / axis 1
            # v_row is the mean over d0, v_col the mean over d1
            v_row = fac_d * v_row + fac_c * (mean_ax1 if d0 == 1 else mean_ax0)
            v_col = fac_d * v_col + fac_c * (mean_ax0 if d0 == 1 else mean_ax1)
            row_factor = F.safe_rsqrt(v_row / (torch.mean(v_row, dim=1, keepdim=True) + 1e-9))
            col_factor = F.safe_rsqrt(v_col)
            fac_a, fac_b = (row_factor, col_factor) if d0 == 1 else (col_factor, row_factor)
            v_diag_new = v_diag
        else:
            v_old = v_diag.contiguous().view(k, n)
            v_diag_new = torch.empty((k, n), dtype=dtype, device=p.device)

        m_new = torch.empty((k, n), dtype=dtype, device=p.device)
        rms_new = torch.empty((1, n), dtype=dtype, device=p.device)

        def build(r0: int, r1: int) -> Tensor:
            nb = (r1 - r0) * b
            e0, e1 = r0 * b, r1 * b
            x = xbuf[: n_ch * nb].view(n_ch, nb)
            g_c = g_f[e0:e1]
            m_c = x[i_m:i_m + k]
            x[0].copy_(g_c)
            x[1].copy_(p_f[e0:e1])
            m_c.copy_(m_new[:, e0:e1])
            x[i_rms].copy_(rms_new[0, e0:e1])
            r = x[i_r]
            torch.add(rms_new[0, e0:e1], 1e-6, out=r).rsqrt_()
            torch.mul(m_c, r, out=x[i_mr:i_mr + k])
            if factored:
                pc = sbuf[: k * nb].view(k, r1 - r0, b)
                torch.mul(fac_a[:, r0:r1, None], fac_b[:, None, :], out=pc)
                pc = pc.view(k, nb)
                torch.mul(pc, g_c, out=x[i_fg:i_fg + k])
                torch.mul(pc, m_c, out=x[i_mf:i_mf + k])
            else:
                v_c = v_diag_new[:, e0:e1]
                fg = x[i_fg:i_fg + k]
                torch.add(v_c, 1e-9, out=fg).clamp_min_(1e-9).rsqrt_().mul_(g_c)
                x[i_v:i_v + k].copy_(v_c)
                torch.add(v_c, 1e-8, out=x[i_rv:i_rv + k]).rsqrt_()
                torch.add(v_c, 1e-6, out=x[i_mf:i_mf + k]).pow_(-0.5).mul_(m_c)
            return x

        norms = torch.empty((len(chunks), n_ch), dtype=dtype, device=p.device)
        x = None
        for i, (r0, r1) in enumerate(chunks):
            e0, e1 = r0 * b, r1 * b
            g_c = g_f[e0:e1]
            mn = torch.mul(m_old[:, e0:e1], mom_d, out=m_new[:, e0:e1])
            mn.addcmul_(g_c, mom_c)
            gs = sbuf[: e1 - e0]
            torch.mul(g_c, g_c, out=gs)
            rn = torch.mul(rms_old[:, e0:e1], rms_d, out=rms_new[:, e0:e1])
            rn.addcmul_(gs, rms_c)
            if not factored:
                vn = torch.mul(v_old[:, e0:e1], fac_d, out=v_diag_new[:, e0:e1])
                vn.addcmul_(gs.add_(F.FACTORED_EPS), fac_c)
            x = build(r0, r1)
            torch.linalg.vector_norm(x, dim=1, out=norms[i])
        sumsq = (norms * norms).sum(dim=0)

        if factored:
            w_x, u_a, u_b = self._fold_factored(w0_feat.to(dtype), bias0, sumsq, v_row, v_col,
                                                dims, shape, n)
            w_x = w_x.T.contiguous()
        else:
            w0 = w0_feat.to(dtype)
            w_x = w0[ref_rows[: 4 + 3 * k]]
            w_v = w0[4 + 3 * k: 4 + 4 * k] + w0[4 + 4 * k: 4 + 5 * k]
            w_rv = w0[4 + 5 * k: 4 + 6 * k] + w0[4 + 6 * k: 4 + 7 * k]
            w_x = torch.cat([w_x, w_v, w_rv, w0[4 + 7 * k:]])
            scale = torch.rsqrt(1e-5 + sumsq / n)
            w_x = (scale.unsqueeze(-1) * w_x).T.contiguous()
        hidden = w_x.shape[0]
        mids = [(w.T.contiguous(), bb.unsqueeze(1)) for w, bb in zip(weights, biases)]
        hbuf = torch.empty((2, max(hidden, *(w.shape[0] for w, _ in mids)) * cap),
                           dtype=dtype, device=p.device)
        new_p = torch.empty(n, dtype=dtype, device=p.device)
        bias_col = bias0.unsqueeze(1)
        for r0, r1 in chunks:
            nb = (r1 - r0) * b
            if len(chunks) > 1:
                x = build(r0, r1)
            h = hbuf[0, : hidden * nb].view(hidden, nb)
            if factored:
                torch.add(u_a[:, r0:r1, None], u_b[:, None, :],
                          out=h.view(hidden, r1 - r0, b))
                h.addmm_(w_x, x)
            else:
                torch.addmm(bias_col, w_x, x, out=h)
            for j, (wt, bc) in enumerate(mids):
                h.relu_()
                out = hbuf[(j + 1) % 2, : wt.shape[0] * nb].view(wt.shape[0], nb)
                h = torch.addmm(bc, wt, h, out=out)
            direction, magnitude = h[0], h[1]
            magnitude.mul_(self.exp_mult).exp_()
            direction.mul_(magnitude).mul_(self.step_mult)
            torch.sub(p_f[r0 * b: r1 * b], direction, out=new_p[r0 * b: r1 * b])

        new_acc = {"m": m_new.view(acc["m"].shape), "rms": rms_new.view(acc["rms"].shape),
                   "v_row": v_row, "v_col": v_col, "v_diag": v_diag_new.view(v_diag.shape)}
        return new_p.view(shape), new_acc


    def _fold_factored(self, w0: Tensor, bias0: Tensor, sumsq: Tensor, v_row: Tensor,
                       v_col: Tensor, dims: tuple[int, int], shape: torch.Size, n: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """First layer of a factored rank-2 tensor with the normalisation folded in.

        Returns ``(w_in, u_a, u_b)``: ``w_in`` (C, H) acts on the per-element channels
        (``g, p, m, rms, m·r, r, fac_g, m·fac``, ``sumsq`` their sums of squares); the
        row/column channels (``v_row, v_col`` and their rsqrt, constant along one axis)
        become hidden biases ``u_a`` (H, shape[0]) — bias0 included — and ``u_b``
        (H, shape[1]).
        """
        k = len(self.initial_momentum_decays)
        d1, d0 = dims
        r_row, r_col, rr_row, rr_col = 4 + 3 * k, 4 + 4 * k, 4 + 5 * k, 4 + 6 * k

        def folded(v: Tensor, count: int, row0: int) -> Tensor:
            # row channels take shape[d0] copies of v_row, column channels shape[d1] of v_col
            scale = torch.rsqrt(1e-5 + (v * v).sum(dim=1) * count / n)
            return (scale.unsqueeze(-1) * w0[row0:row0 + k]).T @ v

        u_row = folded(v_row, shape[d0], r_row) + folded(torch.rsqrt(v_row + 1e-8), shape[d0],
                                                          rr_row)
        u_col = folded(v_col, shape[d1], r_col) + folded(torch.rsqrt(v_col + 1e-8), shape[d1],
                                                          rr_col)
        u_a, u_b = (u_row, u_col) if d0 == 1 else (u_col, u_row)
        rows = list(range(4 + 3 * k)) + list(range(4 + 7 * k, 4 + 8 * k))
        scale = torch.rsqrt(1e-5 + sumsq.to(w0.dtype) / n)
        return scale.unsqueeze(-1) * w0[rows], u_a + bias0.unsqueeze(1), u_b

    # ------------------------------------------------------------------ fused CPU kernel
    def _kernel_ok(self, p: Tensor, g: Tensor, acc: dict[str, Tensor]) -> bool:
        """Whether the fused C kernel applies: the fast path's conditions, a float32 CPU
        vector or matrix, and the reference MLP shape (two hidden layers)."""
        if not (p.dtype == torch.float32 and p.device.type == "cpu"
                and self.hidden_layers == 2 and self._fast_ok(p, g, acc)):
            return False
        kern = cpu_kernels.kernels()
        return kern is not None and kern.supports(len(self.initial_momentum_decays),
                                                  self.hidden_size)

    def _kernel_constants(self, decays: tuple, w0_feat: Tensor, bias0: Tensor,
                          weights: list[Tensor], biases: list[Tensor]) -> dict[str, Any]:
        """What the kernel calls of one step share across tensors (contiguous float32)."""
        k = len(self.initial_momentum_decays)
        mom_d, rms_d, fac_d = decays
        w0 = w0_feat
        rows = list(range(4 + 3 * k)) + list(range(4 + 7 * k, 4 + 8 * k))
        return {
            "mom_d": mom_d.contiguous(), "rms_d": float(torch.clamp(rms_d, 0.0, 1.0)),
            "fac_d": torch.clamp(fac_d, 0.0, 1.0).contiguous(),
            "w_stat": w0[4 + 3 * k:4 + 7 * k].contiguous(),  # v_row, v_col and their rsqrt
            "w_factored": w0[rows].contiguous(),
            # vectors: the v and rsqrt(v) channels are fed twice, so their weights add up
            "w_diag": torch.cat([w0[:4 + 3 * k],
                                 w0[4 + 3 * k:4 + 4 * k] + w0[4 + 4 * k:4 + 5 * k],
                                 w0[4 + 5 * k:4 + 6 * k] + w0[4 + 6 * k:4 + 7 * k],
                                 w0[4 + 7 * k:]]).contiguous(),
            "bias0": bias0.contiguous(), "bias0_col": bias0.reshape(-1, 1).contiguous(),
            "mlp": [t.contiguous() for t in (weights[0], biases[0], weights[1], biases[1])],
        }

    def _kernel_update_tensor(self, p: Tensor, g: Tensor, acc: dict[str, Tensor],
                              const: dict[str, Any], inplace: tuple[float, float] | None = None,
                              scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`_fast_update_tensor` for a float32 CPU vector or matrix, in the fused C
        kernel (diagonal second moments for vectors, factored ones for matrices).

        ``const`` comes from :meth:`_kernel_constants`. ``inplace=(lr, weight_decay)``
        writes ``p + lr·(p_learned − p) − lr·wd·p`` into ``p`` and the new accumulators
        into the old ones (``p``/``acc`` contiguous); ``scale`` multiplies the learned step
        (μLO)."""
        kern = cpu_kernels.kernels()
        k = len(self.initial_momentum_decays)
        n = p.numel()
        diag = p.dim() == 1
        if inplace is not None and not (p.is_contiguous() and acc["m"].is_contiguous()
                                        and acc["rms"].is_contiguous()
                                        and acc["v_diag"].is_contiguous()):
            new_p, new_acc = self._kernel_update_tensor(p, g, acc, const, scale=scale)
            apply_step_(p, new_p, *inplace)
            return p, new_acc
        own = inplace is not None
        g_c, p_c = g.contiguous(), p.contiguous()
        m_old, rms_old = acc["m"].contiguous().view(k, n), acc["rms"].contiguous().view(1, n)
        if diag:
            m_new, rms_new, v_new, sumsq, _ = kern.pass1(
                "small_fc_diag", g_c, p_c, m_old, rms_old, const["mom_d"], const["rms_d"],
                v_old=acc["v_diag"].contiguous().view(k, n), fac_decay=const["fac_d"],
                inplace=own)
            fac_a = fac_b = u_b = None
            u_a, w_in = const["bias0_col"], const["w_diag"]
            mode, v_row, v_col, v_diag = "small_fc_diag", acc["v_row"], acc["v_col"], v_new
        else:
            _, d0 = F.factored_dims(p.shape)
            # the row/column statistics are small: updated in place (copies when pure)
            v_row = acc["v_row"].contiguous() if own else acc["v_row"].clone()
            v_col = acc["v_col"].contiguous() if own else acc["v_col"].clone()
            fac_a, fac_b, u_a, u_b = kern.factored_prepare(
                g_c, d0, v_row, v_col, const["fac_d"], const["w_stat"], const["bias0"],
                channel_last=False)
            m_new, rms_new, _, sumsq, _ = kern.pass1(
                "small_fc", g_c, p_c, m_old, rms_old, const["mom_d"], const["rms_d"], fac_a,
                fac_b, inplace=own)
            mode, v_diag, w_in = "small_fc", acc["v_diag"], const["w_factored"]
        lr, wd = inplace if inplace is not None else (1.0, 0.0)
        new_p = kern.pass2(
            mode, g_c, p_c, m_new, rms_new, fac_a, fac_b, v_diag.view(k, n) if diag else None,
            w_in, sumsq, u_a, u_b, *const["mlp"], self.exp_mult,
            self.step_mult * scale * lr, 1.0 - lr * wd, out=p if own else None)
        new_acc = {"m": m_new.view(acc["m"].shape), "rms": rms_new.view(acc["rms"].shape),
                   "v_row": v_row, "v_col": v_col, "v_diag": v_diag.view(acc["v_diag"].shape)}
        return new_p, new_acc


#: Elements per block of the per-element MLP (keeps a block's features in cache).
_BLOCK_ELEMENTS = 32768


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16 (and float32) parameters, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
