"""The CaMeLS meta-objective, one :class:`~metaopt.bilevel.BilevelProblem` per document.

For a document x with weights w = w_φ(x) (:class:`TokenWeighting`, φ its parameters)
and the base language model's parameters θ₀ (constant):

    inner:  g(θ, φ) = Σ_t w_t m_t ℓ_t(θ; x) / Σ_t m_t          (weighted LM loss)
            θ_K = K steps of SGD(lr) on g from θ₀ (K = 1, lr = 5e-4 in the reference)
    outer:  f(θ_K) = NLL_θK(answer | question)  +  c_kl · KL(p_θ₀ ‖ p_θK) on locality text

ℓ_t is the next-token cross-entropy of token t given tokens < t and m the document's
attention mask. The QA NLL averages the next-token cross-entropy over the answer
tokens of the document's question+answer sequences; the KL is averaged over the real
tokens of unrelated "locality" sequences (c_kl = 0.1 in the reference). The
meta-gradient dF/dφ comes from an estimator of :mod:`metaopt.bilevel` —
:class:`~metaopt.bilevel.Unrolled` (exact through the K steps; second order: the
inner gradient is differentiated with respect to φ), optionally
``Unrolled(checkpoint_segment=S)`` — and a meta-batch of documents runs through
:class:`~metaopt.bilevel.task_batch.TaskBatcher`, the project's one task-batching
path (per-document loop: second-order gradients through LayerNorm are wrong under
``vmap``, pytorch/functorch#534).

First order does not apply: θ₀ does not depend on φ and φ reaches θ_K only through
the inner gradient, so the stop-gradient of :class:`~metaopt.bilevel.FirstOrder`
leaves a meta-gradient of exactly zero. :class:`CaMeLS` refuses it.

``meta_gradient="jvp"`` — the same exact meta-gradient at first-order cost, for one SGD
step on one document (or one group of ``docs_per_step`` documents). With
θ₁ = θ₀ − α ∇g(θ₀) and n = Σ_t m_t,

    dF/dw_t = ⟨∇f(θ₁), dθ₁/dw_t⟩ = −(α/n) · m_t · ⟨∇f(θ₁), ∇ℓ_t(θ₀)⟩,

and the vector of the inner products over t is ONE Jacobian-vector product of the
per-token loss vector ℓ(θ₀) in the direction ∇f(θ₁) (:func:`torch.func.jvp`). So a task
costs a gradient at θ₀, a gradient of f at θ₁, one forward-mode pass and a backward
through the weighting model — no graph through the inner step. dF/dφ is then the
vector-Jacobian product of dF/dw with the weighting model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.bilevel.first_order import FirstOrder
from metaopt.bilevel.inner_loop import unroll
from metaopt.bilevel.problem import BilevelProblem, TaskEstimator
from metaopt.bilevel.task_batch import TaskBatcher, TaskBatchResult, attach_gradient
from metaopt.bilevel.unrolled import Unrolled
from metaopt.optim import sgd
from metaopt.params import Params, functional_call

__all__ = ["CaMeLS", "adapted_lr", "answer_nll", "group_documents", "locality_kl",
           "token_nll", "weighted_lm_loss"]

#: How :class:`CaMeLS` computes dF/dφ.
META_GRADIENTS = ("estimator", "jvp")

#: Why CaMeLS runs documents one at a time.
LOOP_ONLY = ("second-order gradients through LayerNorm are wrong under torch.func.vmap "
             "(pytorch/functorch#534)")


def token_nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Next-token cross-entropy ``(B, T-1)``: entry t-1 is −log p(x_t | x_<t)."""
    V = logits.shape[-1]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1),
                          reduction="none")
    return nll.reshape(input_ids.shape[0], -1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def weighted_lm_loss(logits: Tensor, input_ids: Tensor, weights: Tensor,
                     mask: Tensor) -> Tensor:
    """Σ_t w_t m_t ℓ_t / Σ_t m_t over targets t ≥ 1 (the loss of token t uses w_t)."""
    target_mask = mask[:, 1:].to(logits.dtype)
    nll = token_nll(logits, input_ids)
    return (nll * weights[:, 1:] * target_mask).sum() / target_mask.sum().clamp_min(1.0)


def answer_nll(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the tokens where ``answer_mask`` is 1."""
    return _masked_mean(token_nll(logits, input_ids), answer_mask[:, 1:])


def locality_kl(base_logits: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of KL(p_base ‖ p) of the next-token distributions."""
    log_base = F.log_softmax(base_logits, -1)
    kl = (log_base.exp() * (log_base - F.log_softmax(logits, -1))).sum(-1)
    return _masked_mean(kl, mask)


def group_documents(batch: Sequence[Tensor], group: int) -> tuple[Tensor, ...]:
    """``meta_loss`` arguments of N one-document tasks as N / ``group`` tasks of ``group``
    documents each (their questions and locality rows concatenated), for
    ``CaMeLS(docs_per_step=group)`` (one step on the G documents) or, with
    ``docs_per_step`` dividing G, G / docs_per_step steps on them in sequence:
    ``doc_* (N, T) → (N/G, G, T)``, the others
    ``(N, Q, Tq) → (N/G, G·Q, Tq)``."""
    batch = tuple(batch)
    if group == 1:
        return batch
    doc_ids, doc_mask, *rest = batch
    n = doc_ids.shape[0] // group
    return (doc_ids.reshape(n, group, -1), doc_mask.reshape(n, group, -1),
            *(t.reshape(n, group * t.shape[1], t.shape[2]) for t in rest))


def adapted_lr(names: Sequence[str], lr: float, adapt: Sequence[str] | None
               ) -> float | dict[str, float]:
    """The learning rate of each parameter when only some are adapted.

    ``adapt``: name prefixes of the parameters that are updated (None or empty: all,
    and ``lr`` itself is returned); every other parameter gets learning rate 0 (frozen).
    A prefix that names no parameter is refused.
    """
    if not adapt:
        return lr
    for prefix in adapt:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"adapt: prefix {prefix!r} names no parameter")
    return {n: (lr if any(n.startswith(p) for p in adapt) else 0.0) for n in names}


def _check_dims(name: str, t: Tensor, dims: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != dims:
        raise ValueError(f"{name} must be a tensor with {dims} dims, got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    if name.endswith("_ids") and t.is_floating_point():
        raise ValueError(f"{name} must hold integer token ids, got {t.dtype}")


class CaMeLS:
    """Meta-learns token loss weights so one weighted SGD step teaches a document.

    Args:
        base_model: the language model adapted in the inner loop,
            ``base_model(input_ids, attention_mask) -> logits`` (a
            :class:`~metaopt.models.TinyLM` or a Hugging Face causal LM returning
            ``.logits``). Its parameters are θ₀ and are never changed here.
        weighting: the :class:`TokenWeighting` model; its parameters are φ.
        inner_lr: the inner SGD learning rate.
        inner_steps: inner steps K on each document (each group of ``docs_per_step``).
        docs_per_step: documents in one inner step. A task's D documents are adapted on
            in D / docs_per_step groups, K steps each, every step on the token-mean
            weighted loss of its group — a mini-batch step like :meth:`adapt`'s.
            1 (default): one document at a time; D: one step on all of them, the
            meta-step whose inner step is a plain fine-tuning step on the same batch.
        c_kl: weight of the locality KL term.
        estimator: :class:`~metaopt.bilevel.Unrolled` (default) or any task estimator
            except first-order ones (see the module docstring).
        meta_gradient: ``"estimator"`` (through ``estimator``) or ``"jvp"`` (the exact
            one-step meta-gradient from one Jacobian-vector product, see the module
            docstring; one document per task, ``inner_steps=1``).
        adapt_params: name prefixes of the base parameters the inner step updates (e.g.
            ``["blocks."]``: the transformer blocks, embeddings and head frozen); None:
            all of them (:func:`adapted_lr`).

    ``meta_loss(doc_ids, doc_mask, qa_ids, answer_mask, loc_ids, loc_mask)`` takes a
    meta-batch of N tasks: ``doc_* (N, T)`` (one document each) or ``(N, D, T)`` (D
    documents adapted on in sequence), ``qa_ids, answer_mask (N, Q, Tq)`` (Q
    question+answer sequences per task), ``loc_* (N, L, Tl)``; it returns the
    mean outer loss with the meta-gradient attached (``backward()`` fills the
    weighting model's ``.grad``).
    """

    def __init__(self, base_model: nn.Module, weighting: nn.Module, *, inner_lr: float = 5e-4,
                 inner_steps: int = 1, docs_per_step: int = 1, c_kl: float = 0.1,
                 estimator: TaskEstimator | None = None,
                 meta_gradient: str = "estimator",
                 adapt_params: Sequence[str] | None = None) -> None:
        if meta_gradient not in META_GRADIENTS:
            raise ValueError(f"meta_gradient must be one of {META_GRADIENTS}, got "
                             f"{meta_gradient!r}")
        if meta_gradient == "jvp" and (inner_steps != 1 or estimator is not None):
            raise ValueError("meta_gradient='jvp' is exact for one inner SGD step: needs "
                             "inner_steps=1 and no estimator")
        self.meta_gradient = meta_gradient
        estimator = Unrolled() if estimator is None else estimator
        if isinstance(estimator, FirstOrder) or getattr(estimator, "first_order", False):
            raise ValueError("estimator: first-order gives CaMeLS a zero meta-gradient "
                             "(theta0 does not depend on phi); use Unrolled")
        if not (isinstance(inner_lr, (int, float)) and inner_lr > 0):
            raise ValueError(f"inner_lr must be a number > 0, got {inner_lr!r}")
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
        if not isinstance(docs_per_step, int) or docs_per_step < 1:
            raise ValueError(f"docs_per_step must be an int >= 1, got {docs_per_step!r}")
        if not (isinstance(c_kl, (int, float)) and c_kl >= 0):
            raise ValueError(f"c_kl must be a number >= 0, got {c_kl!r}")
        self.base_model = base_model
        self.weighting = weighting
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.docs_per_step = docs_per_step
        self.c_kl = float(c_kl)
        self.estimator = estimator
        self.adapt_params = tuple(adapt_params) if adapt_params else None
        self._lr = adapted_lr([n for n, _ in base_model.named_parameters()], self.inner_lr,
                              self.adapt_params)
        self._batcher = TaskBatcher("loop")
        self.last_result: TaskBatchResult | None = None

    # -- the pieces ----------------------------------------------------------------
    def outer_parameters(self) -> Params:
        """φ: the weighting model's parameters by name (the live tensors)."""
        return dict(self.weighting.named_parameters())

    def base_parameters(self) -> Params:
        """θ₀: the base model's parameters, detached."""
        return {k: v.detach() for k, v in self.base_model.named_parameters()}

    def logits(self, theta: Params, input_ids: Tensor, mask: Tensor | None) -> Tensor:
        """The base model's logits with parameters θ."""
        out = functional_call(self.base_model, theta, (input_ids,),
                              {"attention_mask": mask})
        return out if isinstance(out, Tensor) else out.logits

    def weights(self, phi: Params, input_ids: Tensor, mask: Tensor) -> Tensor:
        """The token weights ``(B, T)`` of the weighting model with parameters φ."""
        return functional_call(self.weighting, phi, (input_ids,), {"attention_mask": mask})

    def problem(self, doc_ids: Tensor, doc_mask: Tensor, qa_ids: Tensor, answer_mask: Tensor,
                loc_ids: Tensor, loc_mask: Tensor) -> BilevelProblem:
        """One task's bilevel problem (tensors without the meta-batch axis).

        ``doc_ids, doc_mask``: ``(T,)`` — one document — or ``(D, T)`` — D documents
        adapted on in sequence, in groups of ``docs_per_step``, ``inner_steps`` steps
        each (step k uses group ``k // inner_steps``); the questions then cover all D
        documents.
        """
        if doc_ids.dim() == 1:
            doc_ids, doc_mask = doc_ids[None], doc_mask[None]
        per_doc, group = self.inner_steps, self.docs_per_step
        if doc_ids.shape[0] % group:
            raise ValueError(f"docs_per_step={group} does not divide the task's "
                             f"{doc_ids.shape[0]} documents (doc_ids {tuple(doc_ids.shape)})")
        logits, weights, c_kl = self.logits, self.weights, self.c_kl
        with torch.no_grad():
            base_loc = logits(self.base_parameters(), loc_ids, loc_mask)

        def inner_loss(theta: Params, phi: Params, index: int) -> Tensor:
            lo, hi = index * group, (index + 1) * group  # the index-th group of documents
            ids, mask = doc_ids[lo:hi], doc_mask[lo:hi]
            return weighted_lm_loss(logits(theta, ids, mask), ids, weights(phi, ids, mask),
                                    mask)

        def document(step: int) -> int:
            return step // per_doc

        def outer_loss(theta: Params, phi: Params) -> Tensor:
            qa = answer_nll(logits(theta, qa_ids, None), qa_ids, answer_mask)
            if c_kl == 0.0:
                return qa
            return qa + c_kl * locality_kl(base_loc, logits(theta, loc_ids, loc_mask),
                                           loc_mask)

        return BilevelProblem(inner_loss, outer_loss, sgd(self._lr),
                              per_doc * (doc_ids.shape[0] // group), inner_batches=document,
                              name="CaMeLS")

    def task_loss(self, phi: Params, doc_ids: Tensor, doc_mask: Tensor, qa_ids: Tensor,
                  answer_mask: Tensor, loc_ids: Tensor, loc_mask: Tensor, *,
                  functional: bool = False, checks: bool = True) -> Tensor:
        """F(φ) for one document; its gradient is the estimator's meta-gradient."""
        problem = self.problem(doc_ids, doc_mask, qa_ids, answer_mask, loc_ids, loc_mask)
        if self.meta_gradient == "jvp":
            return self._jvp_task_loss(problem, phi, doc_ids, doc_mask)
        return self.estimator.objective(problem, phi, self.base_parameters(),
                                        functional=functional, check_finite=checks).value

    def _jvp_task_loss(self, problem: BilevelProblem, phi: Params, doc_ids: Tensor,
                       doc_mask: Tensor) -> Tensor:
        """F(θ₁) with dF/dφ = (dF/dw)ᵀ ∂w/∂φ, dF/dw from one JVP (module docstring)."""
        ids = doc_ids.reshape(-1, doc_ids.shape[-1])
        mask = doc_mask.reshape(ids.shape)
        if ids.shape[0] != self.docs_per_step:
            raise ValueError(f"meta_gradient='jvp' is one inner step: a task holds "
                             f"docs_per_step={self.docs_per_step} document(s), got doc_ids of "
                             f"shape {tuple(doc_ids.shape)}")
        theta0 = self.base_parameters()
        w = self.weights(phi, ids, mask)
        with torch.enable_grad():
            leaves = {k: v.requires_grad_() for k, v in
                      ((k, v.detach().clone()) for k, v in theta0.items())}
            inner = weighted_lm_loss(self.logits(leaves, ids, mask), ids, w.detach(), mask)
            g = torch.autograd.grad(inner, list(leaves.values()))
            lr = self._lr
            theta1 = {k: (v - (lr[k] if isinstance(lr, dict) else lr) * gk).detach()
                      .requires_grad_() for (k, v), gk in zip(theta0.items(), g)}
            outer = problem.outer_loss(theta1, {k: v.detach() for k, v in phi.items()})
            direction = dict(zip(theta1, torch.autograd.grad(outer, list(theta1.values()))))
            if isinstance(lr, dict):  # frozen parameters do not move: no direction there
                direction = {k: d if lr[k] else torch.zeros_like(d) for k, d in direction.items()}

        def per_token(theta: Params) -> Tensor:
            return token_nll(self.logits(theta, ids, mask), ids)

        _, dots = torch.func.jvp(per_token, (theta0,), (direction,))
        target_mask = mask[:, 1:].to(dots.dtype)
        d_w = -(self.inner_lr / target_mask.sum().clamp_min(1.0)) * target_mask * dots
        surrogate = (w[:, 1:] * d_w.detach()).sum()
        return outer.detach() + surrogate - surrogate.detach()

    # -- the public API ------------------------------------------------------------
    def meta_loss(self, doc_ids: Tensor, doc_mask: Tensor, qa_ids: Tensor,
                  answer_mask: Tensor, loc_ids: Tensor, loc_mask: Tensor) -> Tensor:
        """Mean outer loss over the documents; ``backward()`` gives dF/dφ."""
        tasks = [doc_ids, doc_mask, qa_ids, answer_mask, loc_ids, loc_mask]
        names = ["doc_ids", "doc_mask", "qa_ids", "answer_mask", "loc_ids", "loc_mask"]
        doc_dims = 3 if isinstance(doc_ids, Tensor) and doc_ids.dim() == 3 else 2
        for name, t, dims in zip(names, tasks, (doc_dims, doc_dims, 3, 3, 3, 3)):
            _check_dims(name, t, dims)
            if t.shape[0] != doc_ids.shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} documents, doc_ids has "
                                 f"{doc_ids.shape[0]}")
        for a, b in (("doc_mask", "doc_ids"), ("answer_mask", "qa_ids"),
                     ("loc_mask", "loc_ids")):
            ta, tb = tasks[names.index(a)], tasks[names.index(b)]
            if ta.shape != tb.shape:
                raise ValueError(f"{a} shape {tuple(ta.shape)} != {b} shape {tuple(tb.shape)}")
        if not bool((answer_mask[..., 1:] != 0).any(-1).all()):
            raise ValueError("answer_mask: every question+answer sequence needs at least "
                             "one answer token after position 0")
        phi = self.outer_parameters()
        result = self._batcher.run(self.task_loss, phi, tasks, need_grad=torch.is_grad_enabled(),
                                   loop_only=LOOP_ONLY)
        self.last_result = result
        if result.grads is None:
            return result.mean
        return attach_gradient(result.mean, phi, result.grads)

    def adapt(self, doc_ids: Tensor, doc_mask: Tensor, weights: Tensor | None = None,
              theta: Params | None = None) -> Params:
        """θ after the inner steps on a batch of documents ``(B, T)`` (detached).

        ``weights``: per-token weights ``(B, T)`` (None: the weighting model's);
        ``theta``: the starting parameters (None: the base model's).
        """
        theta = self.base_parameters() if theta is None else theta
        with torch.no_grad():
            w = (self.weights(self.outer_parameters(), doc_ids, doc_mask)
                 if weights is None else weights.detach())
        logits = self.logits

        def loss(th: Params, step: int) -> Tensor:
            return weighted_lm_loss(logits(th, doc_ids, doc_mask), doc_ids, w, doc_mask)

        with torch.no_grad():
            trace = unroll(loss, sgd(self._lr), dict(theta), self.inner_steps,
                           stop_gradient=True)
        return {k: v.detach() for k, v in trace.theta.items()}
