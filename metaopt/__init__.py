"""metaopt: meta-learning and learned optimizers for PyTorch.

The functional core (parameter dicts, differentiable optimizers, hypergradient
estimators) lives in :mod:`metaopt.params`, :mod:`metaopt.optim` and
:mod:`metaopt.bilevel`; algorithms, learned optimizers and the experiment runner
build on it.
"""

from metaopt.params import Params, functional_call, parameters_of

__version__ = "0.1.0"

__all__ = ["Params", "__version__", "functional_call", "parameters_of"]
