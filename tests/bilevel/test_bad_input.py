"""Bad input gets a clear message, never a silent NaN hypergradient."""

import math
import warnings

import pytest
import torch

from metaopt.bilevel import BilevelProblem, Implicit, LinearSolveWarning, Unrolled
from metaopt.bilevel.reference_problems import ridge_problem
from metaopt.optim import sgd
from metaopt.params import NonFiniteError, StructureError, tree_map


def test_non_scalar_inner_loss_is_named():
    prob = BilevelProblem(lambda th, ph: th["w"] * ph["a"], lambda th, ph: th["w"].sum(),
                          sgd(0.1), inner_steps=2, name="toy")
    with pytest.raises(ValueError, match=r"toy: inner_loss must return a scalar, got shape \(3,\)"):
        Unrolled()(prob, {"a": torch.ones(3)}, {"w": torch.ones(3)})


def test_nan_in_inner_loop_names_step_and_tensor():
    # Step size far above 2/L: the iterates blow up to inf and then NaN.
    ref = ridge_problem(d=5, inner_steps=2000, dtype=torch.float32)
    prob = BilevelProblem(ref.problem.inner_loss, ref.problem.outer_loss, sgd(100.0), 2000)
    with pytest.raises(NonFiniteError, match=r"inner (loss|parameter 'w').*inner step \d+"):
        Unrolled()(prob, ref.phi, ref.theta0)
    with pytest.raises(NonFiniteError, match=r"inner step \d+"):
        Implicit()(prob, ref.phi, ref.theta0)


def test_mismatched_parameter_dicts_are_reported():
    with pytest.raises(StructureError, match=r"keys in first tree but not tree 2: \['b'\]"):
        tree_map(torch.add, {"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)})
    ref = ridge_problem(d=4, inner_steps=5)
    prob = BilevelProblem(ref.problem.inner_loss, ref.problem.outer_loss, sgd(0.1), 5)

    def bad_optimality(theta, phi):
        return {"not_w": theta["w"]}

    with pytest.raises(StructureError, match="not_w"):
        Implicit(optimality=bad_optimality)(prob, ref.phi, ref.theta0)


def test_non_converging_solve_warns_with_residual():
    ref = ridge_problem(d=20, inner_steps=300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hg = Implicit(solver="cg", max_iter=2)(ref.problem, ref.phi, ref.theta0)
    messages = [str(w.message) for w in caught if issubclass(w.category, LinearSolveWarning)]
    assert messages and "relative residual" in messages[0]
    assert not hg.diagnostics["linear_converged"]
    assert math.isfinite(hg.diagnostics["linear_residual"])


def test_bad_configuration_values_are_rejected():
    with pytest.raises(ValueError, match="sgd lr must be"):
        sgd(-0.1)
    with pytest.raises(ValueError, match="inner_steps must be"):
        BilevelProblem(lambda t, p: t, lambda t, p: t, sgd(0.1), inner_steps=-1)
    with pytest.raises(ValueError, match="truncate"):
        Unrolled(truncate=-2)
    with pytest.raises(TypeError, match="outer parameter 'k' has dtype torch.int64"):
        ref = ridge_problem(d=3, inner_steps=2)
        Unrolled()(ref.problem, {"k": torch.ones(3, dtype=torch.long)}, ref.theta0)
