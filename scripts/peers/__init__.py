"""Peer MAML implementations for the side-by-side benchmark (issue 6).

Every peer module exposes

``make_step(model, inner_steps, inner_lr, loss_fn) -> step`` where ``step(tasks)``
zeroes the model's gradients, computes the full second-order MAML meta-loss (mean query
loss over the tasks), back-propagates it into the model's ``.grad`` and returns the
detached meta-loss. ``common.run_meta_gradient(make_step, (factory, state_dict), tasks,
inner_steps, inner_lr, loss_fn) -> (meta_loss, grads)`` runs one meta-step of any of them
on a fresh model; ``common.per_task_step`` is the task loop they share.

``tasks`` is ``(support_x, support_y, query_x, query_y)`` with a leading task axis, the
same tensors metaopt's ``MAML.meta_loss`` takes. All peers back-propagate each task's
``query_loss / n_tasks`` inside the task loop (gradients accumulate), which is what the
peers' own MAML examples do and keeps one task's graph alive at a time.
"""
