"""Bilevel problems and their hypergradient estimators, behind one interface.

Describe the problem once (:class:`BilevelProblem`), then pick an estimator::

    hg = Unrolled()(problem, phi, theta0)            # backprop through K steps
    hg = Unrolled(checkpoint_segment=32)(...)         # same numbers, bounded memory
    hg = Implicit(solver="cg")(problem, phi, theta0)  # implicit function theorem
    hg.grad, hg.theta, hg.diagnostics

A batch of tasks, each its own bilevel problem (the MAML family), runs through
:mod:`metaopt.bilevel.task_batch` with any estimator that gives an
:class:`Objective` (``Unrolled``, ``FirstOrder``, ``Implicit``). The inner loop
itself is :func:`unroll` in :mod:`metaopt.bilevel.inner_loop`.

Long inner problems are meta-trained in truncations by :class:`TruncatedBPTT`,
:class:`ES` and :class:`PES` over an :class:`InnerSystem` (many tasks advanced
together, state carried across calls in ``hg.state``; see
:mod:`metaopt.bilevel.truncation`).
"""

from metaopt.bilevel.bome import BOME
from metaopt.bilevel.check import (
    HypergradCheck,
    HypergradCheckError,
    finite_difference_hypergradient,
    hypergradcheck,
)
from metaopt.bilevel.es import ES
from metaopt.bilevel.f2sa import F2SA, F2SAState
from metaopt.bilevel.first_order import FirstOrder
from metaopt.bilevel.implicit import Implicit, custom_fixed_point, custom_root
from metaopt.bilevel.inner_loop import InnerTrace, inner_gradient, unroll
from metaopt.bilevel.linear_solve import LinearSolveWarning, SolveInfo
from metaopt.bilevel.outer import (
    OuterResult,
    OuterState,
    hypergradient_descent,
    outer_init,
    outer_step,
)
from metaopt.bilevel.pes import PES
from metaopt.bilevel.problem import (
    BilevelProblem,
    Estimator,
    Hypergradient,
    Objective,
    TaskEstimator,
)
from metaopt.bilevel.task_batch import (
    TaskBatcher,
    TaskBatchResult,
    attach_gradient,
    merge_results,
    run_loop,
    run_vmap,
)
from metaopt.bilevel.truncated_bptt import TruncatedBPTT
from metaopt.bilevel.truncation import (
    BilevelSystem,
    ConstantLength,
    InnerSystem,
    LogUniformLength,
    TruncatedState,
)
from metaopt.bilevel.unrolled import Unrolled

__all__ = [
    "BOME",
    "ES",
    "F2SA",
    "PES",
    "BilevelProblem",
    "BilevelSystem",
    "ConstantLength",
    "Estimator",
    "F2SAState",
    "FirstOrder",
    "HypergradCheck",
    "HypergradCheckError",
    "Hypergradient",
    "Implicit",
    "InnerSystem",
    "InnerTrace",
    "LinearSolveWarning",
    "LogUniformLength",
    "Objective",
    "OuterResult",
    "OuterState",
    "SolveInfo",
    "TaskBatchResult",
    "TaskBatcher",
    "TaskEstimator",
    "TruncatedBPTT",
    "TruncatedState",
    "Unrolled",
    "attach_gradient",
    "custom_fixed_point",
    "custom_root",
    "finite_difference_hypergradient",
    "hypergradcheck",
    "hypergradient_descent",
    "inner_gradient",
    "merge_results",
    "outer_init",
    "outer_step",
    "run_loop",
    "run_vmap",
    "unroll",
]
