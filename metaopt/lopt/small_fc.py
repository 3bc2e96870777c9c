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
    def decays(self, meta: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Meta-learned (momentum, rms, adafactor) decays (of ``meta``, the meta-parameters
        by name, when given; else of the module's own)."""
        meta = dict(self.named_parameters()) if meta is None else meta
        return (F.decays_from_offsets(self.initial_momentum_decays, meta["momentum_decays"]),
                F.decays_from_offsets(self.initial_rms_decays, meta["rms_decays"]),
                F.decays_from_offsets(self.initial_adafactor_decays, meta["adafactor_decays"]))

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

    def _update(self, grads: Params, state: LOptState, params: Params, loss: Tensor | None,
                backend: cpu_kernels.LoptCpuKernels | None) -> tuple[Params, LOptState]:
        """One step for every tensor; pure (returns new params and a new state). The loss
        is not used. With ``backend``, float32 CPU vectors/matrices outside autograd go
        through the fused kernel; everything else takes the reference
        :meth:`_update_tensor`."""
        del loss
        return self._step(grads, state, params, None, backend)

    def _update_(self, grads: Params, state: LOptState, params: Params, loss: Tensor | None,
                 lr: Mapping[str, float], weight_decay: Mapping[str, float],
                 backend: cpu_kernels.LoptCpuKernels | None, workspace: dict | None
                 ) -> LOptState:
        """In-place step: the fused kernel writes into the parameters and accumulators."""
        del loss
        _, new_state = self._step(grads, state, params, (lr, weight_decay), backend, workspace)
        return new_state

    def _step(self, grads: Params, state: LOptState, params: Params,
              inplace: tuple[Mapping[str, float], Mapping[str, float]] | None,
              kern: cpu_kernels.LoptCpuKernels | None, workspace: dict | None = None
              ) -> tuple[Params, LOptState]:
        """Shared loop of :meth:`_update` and (``inplace=(lr, weight_decay)``) :meth:`_update_`:
        every tensor the fused kernels step (:meth:`_kernel_ok`) in one
        :meth:`_kernel_step`, the others through the reference :meth:`_update_tensor`.
        ``workspace`` (the in-place shell's) keeps the kernel plan across steps."""
        iteration = state["iteration"]
        new_state: LOptState = {k: {} for k in _ACCUMULATORS}
        new_params: Params = {}
        cache: dict[tuple[torch.dtype, torch.device], tuple] = {}
        fused: list[str] = []
        for name, p in params.items():
            g = grads[name]
            acc = {k: state[k][name] for k in _ACCUMULATORS}
            if kern is not None and self._kernel_ok(kern, p, g, acc):
                fused.append(name)
                continue
            key = (_compute_dtype(p.dtype), p.device)
            if key not in cache:
                cache[key] = self._prepare(iteration, *key)
            scale = self._step_scale(state, name)
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
        if fused:
            self._kernel_step(kern, fused, grads, state, params, inplace, new_params, new_state,
                              workspace)
            new_params = {name: new_params[name] for name in params}
            for k in _ACCUMULATORS:
                new_state[k] = {name: new_state[k][name] for name in params}
        new_state["iteration"] = iteration + 1
        new_state["num_steps"] = state["num_steps"]
        for extra in state.keys() - new_state.keys():  # e.g. μLO's per-tensor scales
            new_state[extra] = state[extra]
        return new_params, new_state

    def _step_scale(self, state: LOptState, name: str) -> Tensor | float:
        """Extra multiplier of tensor ``name``'s step (1 here; μLO's μP scale)."""
        return 1.0

    def _prepare(self, iteration: Tensor, dtype: torch.dtype, device: torch.device,
                 meta: Mapping[str, Tensor] | None = None) -> tuple:
        """Decays, MLP weights and the (constant per step) time-feature bias of layer 0
        (from ``meta`` when given, else the module's parameters).

        Broadcasts over leading row axes: with ``meta`` leaves of shape ``(R, ...)`` and
        ``iteration`` of shape ``(R,)`` every result gets the leading ``R`` (each row the
        unbatched result of its own row; :meth:`update_rows`)."""
        meta = dict(self.named_parameters()) if meta is None else meta
        decays = tuple(d.to(dtype=dtype, device=device) for d in self.decays(meta))
        weights = [meta[f"w{i}"].to(dtype=dtype, device=device) for i in range(self.n_layers)]
        biases = [meta[f"b{i}"].to(dtype=dtype, device=device) for i in range(self.n_layers)]
        time = F.tanh_time_embedding(iteration.to(device).unsqueeze(-1),
                                     dtype=torch.float32).to(dtype)
        w0_feat = weights[0][..., : self.n_features, :]
        w0_time = weights[0][..., self.n_features:, :]
        # (1, T) @ (T, H) is what torch.matmul does for a (T,) vector: the same rounding
        bias0 = torch.matmul(time.unsqueeze(-2), w0_time).squeeze(-2) + biases[0]
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

    # ------------------------------------------------------------------ fused CPU kernel
    def _kernel_ok(self, kern: cpu_kernels.LoptCpuKernels, p: Tensor, g: Tensor,
                   acc: dict[str, Tensor], rows: int = 0) -> bool:
        """Whether the fused C kernel steps this tensor (decided by structure alone): no
        autograd graph is recorded, a non-empty float32 CPU vector or matrix with float32
        gradient and accumulators, and the architecture shape the library is built for
        (two hidden layers, one rms decay, as many momentum as adafactor decays).
        ``rows > 0``: the tensors are ``rows`` stacked rows of such tensors."""
        k = len(self.initial_momentum_decays)
        lead = 1 if rows else 0
        return (not torch.is_grad_enabled() and p.dim() - lead in (1, 2) and p.numel() > 0
                and (not rows or p.shape[0] == rows)
                and p.dtype is torch.float32 and g.dtype is torch.float32
                and p.is_cpu and g.is_cpu
                and self.hidden_layers == 2 and len(self.initial_rms_decays) == 1
                and len(self.initial_adafactor_decays) == k
                and all(v.dtype is torch.float32 for v in acc.values())
                and kern.supports(k, self.hidden_size))

    def _kernel_constants(self, decays: tuple, w0_feat: Tensor, bias0: Tensor,
                          weights: list[Tensor], biases: list[Tensor]) -> dict[str, Any]:
        """What the kernel calls of one step share across tensors (contiguous float32;
        with a leading row axis when :meth:`_prepare` gave one)."""
        k = len(self.initial_momentum_decays)
        mom_d, rms_d, fac_d = decays
        w0 = w0_feat
        rows = list(range(4 + 3 * k)) + list(range(4 + 7 * k, 4 + 8 * k))
        return {
            "mom_d": mom_d.contiguous(), "rms_d": torch.clamp(rms_d, 0.0, 1.0).squeeze(-1),
            "fac_d": torch.clamp(fac_d, 0.0, 1.0).contiguous(),
            # v_row, v_col and their rsqrt
            "w_stat": w0[..., 4 + 3 * k:4 + 7 * k, :].contiguous(),
            "w_factored": w0[..., rows, :].contiguous(),
            # vectors: the v and rsqrt(v) channels are fed twice, so their weights add up
            "w_diag": torch.cat([w0[..., :4 + 3 * k, :],
                                 w0[..., 4 + 3 * k:4 + 4 * k, :] + w0[..., 4 + 4 * k:4 + 5 * k, :],
                                 w0[..., 4 + 5 * k:4 + 6 * k, :] + w0[..., 4 + 6 * k:4 + 7 * k, :],
                                 w0[..., 4 + 7 * k:, :]], dim=-2).contiguous(),
            "bias0": bias0.contiguous(),
            "mlp": [t.contiguous() for t in (weights[0], biases[0], weights[1], biases[1])],
        }

    def _kernel_step(self, kern: cpu_kernels.LoptCpuKernels, names: list[str],
                     grads: Params, state: LOptState, params: Params,
                     inplace: tuple[Mapping[str, float], Mapping[str, float]] | None,
                     new_params: Params, new_state: LOptState, workspace: dict | None) -> None:
        """:meth:`_update_tensor` for the float32 CPU vectors and matrices ``names``, all in
        one :meth:`~metaopt.lopt.cpu_kernels.LoptCpuKernels.small_fc_rows` call (``R = 1``;
        diagonal second moments for vectors, factored ones for matrices), written into
        ``new_params`` / ``new_state``.

        ``inplace=(lr, weight_decay)`` writes ``p·(1 − lr·wd) − lr·step`` into ``p`` and the
        new accumulators into the old ones; a tensor whose parameter or state is not
        contiguous is stepped out of place and then applied with
        :func:`~metaopt.lopt.base.apply_step_` (in a second call). ``_step_scale``
        multiplies the learned step (μLO). With a ``workspace`` the in-place call goes
        through a :class:`~metaopt.lopt.cpu_kernels.SmallFCPlan` kept there (checked once,
        rebuilt when the tensors change)."""
        const = _one_row(self._kernel_constants(
            *self._prepare(state["iteration"], torch.float32, torch.device("cpu"))))
        direct: list[tuple[str, float, float, float]] = []
        copied: list[tuple[str, float, float, float]] = []
        for name in names:
            lr, wd = (1.0, 0.0) if inplace is None else (inplace[0].get(name, 1.0),
                                                         inplace[1].get(name, 0.0))
            scale = float(self._step_scale(state, name))
            if inplace is None or (params[name].is_contiguous() and all(
                    state[k][name].is_contiguous() for k in _ACCUMULATORS)):
                direct.append((name, lr, wd, scale))
            else:
                copied.append((name, lr, wd, scale))
        if inplace is not None and workspace is not None and direct:
            self._planned_step(kern, workspace, direct, grads, state, params, const)
            new_params.update((name, params[name]) for name, *_ in direct)
            for k in _ACCUMULATORS:
                new_state[k].update((name, state[k][name]) for name, *_ in direct)
            direct = []
        for batch, write in ((direct, inplace is not None), (copied, False)):
            if not batch:
                continue
            items = [cpu_kernels.SmallFCRows(
                *(t.contiguous().unsqueeze(0) for t in (
                    grads[name], params[name], *(state[k][name] for k in _ACCUMULATORS))),
                _factored_d0(params[name].shape)) for name, *_ in batch]
            if write:
                coef = [[self.step_mult * scale * lr] for _, lr, _, scale in batch]
                p_decay = [[1.0 - lr * wd] for _, lr, wd, _ in batch]
            else:
                coef = [[self.step_mult * scale] for *_, scale in batch]
                p_decay = [[1.0]] * len(batch)
            outs = kern.small_fc_rows(items, const, self.exp_mult, coef, p_decay, inplace=write)
            for (name, lr, wd, _), out in zip(batch, outs):
                p = params[name]
                new_p = out[0].view(p.shape)
                if inplace is not None and not write:
                    apply_step_(p, new_p, lr, wd)
                    new_p = p
                new_params[name] = new_p
                for k, v in zip(_ACCUMULATORS, out[1:]):
                    new_state[k][name] = v.view(state[k][name].shape)

    def _planned_step(self, kern: cpu_kernels.LoptCpuKernels, workspace: dict,
                      batch: list[tuple[str, float, float, float]], grads: Params,
                      state: LOptState, params: Params, const: dict[str, Any]) -> None:
        """The in-place kernel step of ``batch`` (contiguous tensors: name, lr, wd, scale)
        through the workspace's plan (built, or rebuilt, when its tensors changed)."""
        items = [cpu_kernels.SmallFCRows(
            grads[name].contiguous(), params[name], *(state[k][name] for k in _ACCUMULATORS),
            _factored_d0(params[name].shape)) for name, *_ in batch]
        plan = workspace.get("small_fc_plan")
        if plan is None or plan.kern is not kern or not plan.matches(items):
            plan = workspace["small_fc_plan"] = kern.small_fc_plan(items)
        plan.step([item.g for item in items], const, self.exp_mult,
                  [self.step_mult * scale * lr for _, lr, _, scale in batch],
                  [1.0 - lr * wd for _, lr, wd, _ in batch])

    # ------------------------------------------------------------------ batched rows
    def rows_supported(self, kern: cpu_kernels.LoptCpuKernels | None, params: Params,
                       state: LOptState) -> bool:
        """Whether :meth:`update_rows` can step these rows (decided by structure alone):
        the kernels are given and built for this architecture, no autograd graph is
        recorded, and every row of every tensor is a non-empty float32 CPU vector or
        matrix with float32 accumulators."""
        if kern is None or not params:
            return False
        rows = state["iteration"].shape
        return len(rows) == 1 and rows[0] > 0 and all(
            self._kernel_ok(kern, p, p, {k: state[k][name] for k in _ACCUMULATORS}, rows[0])
            for name, p in params.items())

    def update_rows(self, meta_rows: Params, grads: Params, state: LOptState, params: Params,
                    kern: cpu_kernels.LoptCpuKernels) -> tuple[Params, LOptState]:
        """``R`` independent steps at once: row ``r`` of every parameter, gradient and
        state leaf is one task, stepped with row ``r`` of ``meta_rows`` (ES/PES particles).

        The same result as ``vmap`` of :meth:`update_unchecked` over rows (tested, to
        float32 rounding), through the fused kernels: the per-step constants of all rows
        at once (:meth:`_prepare` and :meth:`_kernel_constants` broadcast over rows), then
        one checked
        :meth:`~metaopt.lopt.cpu_kernels.LoptCpuKernels.small_fc_rows` call (one C call)
        for every row of every tensor.
        Requires :meth:`rows_supported`; no host-side guards (the estimators flag and
        reset non-finite rows). Pure: returns new parameters and a new state."""
        # (dtypes, devices, shapes and contiguity are checked by small_fc_rows itself)
        if kern is None or torch.is_grad_enabled():
            raise ValueError("update_rows needs the fused kernels and float32 CPU vector or "
                             "matrix rows outside autograd (see rows_supported)")
        iteration = state["iteration"]
        # every row's constants at once (_prepare and _kernel_constants broadcast over rows)
        const = self._kernel_constants(*self._prepare(iteration, torch.float32,
                                                      torch.device("cpu"), meta_rows))
        const["rms_d"] = const["rms_d"].contiguous()
        rows = iteration.shape[0]
        names = list(params)
        items, coef = [], []
        for name in names:
            items.append(cpu_kernels.SmallFCRows(
                *(t.contiguous() for t in (grads[name], params[name],
                                           *(state[k][name] for k in _ACCUMULATORS))),
                _factored_d0(params[name].shape[1:])))
            scale = self._step_scale(state, name)
            # step_mult · scale in float64, rounded once to float32 (as a C float argument)
            coef.append((scale.double() * self.step_mult).float().reshape(rows)
                        if isinstance(scale, Tensor)
                        else torch.full((rows,), self.step_mult * float(scale)))
        outs = kern.small_fc_rows(items, const, self.exp_mult, torch.stack(coef),
                                  torch.ones(len(names), rows), inplace=False)
        new_params: Params = {name: out[0] for name, out in zip(names, outs)}
        stepped = {k: {name: out[1 + i] for name, out in zip(names, outs)}
                   for i, k in enumerate(_ACCUMULATORS)}
        stepped["iteration"] = iteration + 1
        # the state's own key order (the rows' trees keep one structure); other entries,
        # e.g. μLO's per-tensor scales, and num_steps are carried over
        return new_params, {key: stepped.get(key, value) for key, value in state.items()}


def _one_row(const: dict[str, Any]) -> dict[str, Any]:
    """Per-step kernel constants (one set) in ``small_fc_rows``' layout for ``R = 1``."""
    one = {key: v.unsqueeze(0) for key, v in const.items() if key != "mlp"}
    one["mlp"] = [t.unsqueeze(0) for t in const["mlp"]]
    return one


def _factored_d0(shape: torch.Size) -> int | None:
    """The axis ``v_row`` averages over (``features.factored_dims``), None for vectors."""
    dims = F.factored_dims(shape)
    return None if dims is None else dims[1]


#: Elements per block of the per-element MLP (keeps a block's features in cache).
_BLOCK_ELEMENTS = 32768


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16 (and float32) parameters, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
