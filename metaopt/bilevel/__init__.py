"""Bilevel problems and their hypergradient estimators, behind one interface.

Describe the problem once (:class:`BilevelProblem`), then pick an estimator::

    hg = Unrolled()(problem, phi, theta0)            # backprop through K steps
    hg = Unrolled(checkpoint_segment=32)(...)         # same numbers, bounded memory
    hg = Implicit(solver="cg")(problem, phi, theta0)  # implicit function theorem
    hg.grad, hg.theta, hg.diagnostics
"""

from metaopt.bilevel.first_order import FirstOrder
from metaopt.bilevel.problem import BilevelProblem, Estimator, Hypergradient
from metaopt.bilevel.unroll import InnerTrace, inner_gradient, unroll
from metaopt.bilevel.unrolled import Unrolled
from metaopt.registry import ESTIMATORS

ESTIMATORS.register("unrolled", Unrolled, replace=True)
ESTIMATORS.register("first_order", FirstOrder, replace=True)

__all__ = [
    "BilevelProblem",
    "Estimator",
    "FirstOrder",
    "Hypergradient",
    "InnerTrace",
    "Unrolled",
    "inner_gradient",
    "unroll",
]
