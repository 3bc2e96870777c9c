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
  a time) and ``backward()`` on the returned scalar deposits it into ``.grad``;
  it does not support differentiating twice. Under ``torch.no_grad()`` it only
  evaluates (inner steps still take gradients). ``last_task_losses`` holds the
  per-task query losses.
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
* ``strategy="auto" | "loop" | "vmap"`` and ``chunk_size``: how the meta-batch
  runs. ``chunk_size`` is the memory budget: how many tasks' autograd graphs may
  be alive at once. ``auto`` (default) keeps to it — by default one task, the
  per-task loop, with the peak memory of higher/learn2learn/TorchOpt — and within
  it takes the faster strategy: with ``chunk_size=n > 1`` it times the loop
  against ``vmap`` over chunks of ``n`` tasks on the first meta-batch of each
  shape, checks that vmap reproduces the loop's numbers, and keeps the faster; a
  model vmap cannot run (in-place buffer writes, …) falls back to the loop with a
  warning. Second-order meta-gradients through BatchNorm/InstanceNorm in training
  mode or LayerNorm are wrong under ``torch.func.vmap`` in torch 2.13
  (pytorch/functorch#534, reproduced in our tests), so such models always use the
  loop (``strategy="vmap"`` raises). On the sinusoid MLP, ``chunk_size`` = the
  meta-batch is 2-7x faster than the loop at 9-65x its peak memory
  (``scripts/bench_maml_peers.py``).
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
