"""The MAML family on any unmodified ``nn.Module``.

Every algorithm has the same face::

    from metaopt.algorithms import MAML
    maml = MAML(model, inner_lr=0.4, inner_steps=1, first_order=False)  # any nn.Module
    loss = maml.meta_loss(support_x, support_y, query_x, query_y, loss_fn)
    loss.backward()                      # meta-gradients land in model's .grad
    adapted = maml.adapt(x, y, loss_fn)  # adapted parameters (a name → tensor dict)
    logits = maml.predict(adapted, x_test)

* ``support_x, support_y, query_x, query_y`` carry a leading task axis:
  ``(tasks, examples, ...)``. ``loss_fn(predictions, targets)`` returns a scalar
  (``F.cross_entropy``, ``F.mse_loss``, …).
* ``meta_loss`` returns the mean query loss over tasks. The meta-gradient is
  computed inside ``meta_loss`` task by task (so only one task's graph is alive at
  a time, or one ``vmap`` chunk's) and the returned scalar behaves as a loss:
  ``backward()`` on it, on a multiple of it or on a sum with a regulariser of φ or
  another meta-loss deposits the right gradient into ``.grad``; it supports one
  ``backward()``, not higher-order differentiation. Under ``torch.no_grad()`` it
  only evaluates (inner steps still take gradients). ``last_task_losses`` holds the
  per-task query losses.
* Each task is a :class:`metaopt.bilevel.BilevelProblem` and its meta-gradient
  comes from an estimator: ``MAML(model)`` = ``Unrolled()``; switch in one line with
  ``estimator=Unrolled(checkpoint_segment=4)`` (same numbers, memory ~K/S + S),
  ``estimator=Unrolled(truncate=T)``, ``first_order=True`` (``FirstOrder()``) or
  ``estimator=Implicit(...)`` (iMAML's proximal problem, ``proximal=λ``).
* ``adapt(x, y, loss_fn, steps=None)`` takes one task without the task axis and
  returns detached adapted parameters (``differentiable=True`` keeps the graph);
  ``predict(params, x)`` runs the model with them.
* Reptile's ``meta_loss`` is the mean of ½‖φ − stop_grad(θ_K)‖² over tasks: its
  gradient is the Reptile direction φ − mean θ_K; the query loss is reported in
  ``last_query_loss`` / ``last_task_losses``. iMAML's meta-gradient comes from
  :class:`metaopt.bilevel.Implicit`: CG on (I + H/λ) u = g, truncated at the first
  negative curvature when the non-convex support loss makes the system indefinite
  (see :mod:`metaopt.algorithms.imaml`).
* The algorithm objects are ``nn.Module`` s wrapping the model: give
  ``algo.parameters()`` to the outer optimizer (that includes Meta-SGD's learned
  learning rates).
* ``strategy="auto" | "loop" | "vmap"``, ``memory_budget`` and ``chunk_size``: how
  the meta-batch runs (:mod:`metaopt.bilevel.task_batch`, the one task-batching
  module). ``auto`` (default) decides from a memory budget in bytes
  (``memory_budget="256MiB"``, or an int), never from timing: the first meta-batch
  of each input shape runs the per-task loop and measures one task's footprint
  (bytes of the tensors saved for backward); later meta-batches run
  ``torch.func.vmap`` over chunks of as many tasks as fit the budget
  (``chunk_size`` caps it), or the loop when fewer than two fit. Deterministic
  rules come first: second-order meta-gradients through BatchNorm/InstanceNorm in
  training mode or LayerNorm are wrong under vmap (pytorch/functorch#534), so
  those models always loop (``strategy="vmap"`` raises); so do estimators that run
  one task at a time (``Implicit``, checkpointed ``Unrolled``); convolutions on CPU
  (grouped convolutions under vmap, slower) and modules of the user's own classes
  (in-place buffer writes, data-dependent control flow) loop under ``auto`` — give
  ``strategy="vmap"`` to use it anyway. On the sinusoid MLP the default therefore
  runs vmap over the whole meta-batch, 2-7x faster than the loop.
* The model runs as ``torch.func.functional_call`` or, where it is provably the
  same computation, as a ``torch.fx`` trace of its forward with the parameters as
  arguments (no per-call module patching; see ``_model``).
* BatchNorm: in training mode every support/query set is normalised with its own
  batch statistics and running statistics are never updated by the algorithms;
  in eval mode running statistics are used (read-only). See ``_model``.

Algorithms: :class:`MAML`, :class:`FOMAML` (= ``MAML(first_order=True)``),
:class:`ANIL`, :class:`MetaSGD`, :class:`Reptile`, :class:`iMAML`.
"""

from metaopt.algorithms.anil import ANIL
from metaopt.algorithms.base import LossFn, MetaLearner
from metaopt.algorithms.imaml import iMAML
from metaopt.algorithms.maml import FOMAML, MAML
from metaopt.algorithms.meta_sgd import MetaSGD
from metaopt.algorithms.reptile import Reptile

__all__ = ["ANIL", "FOMAML", "MAML", "LossFn", "MetaLearner", "MetaSGD", "Reptile", "iMAML"]
