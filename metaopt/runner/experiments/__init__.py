"""Built-in experiments, one a module: ``ridge_hyper``, ``hypercleaning``, ``few_shot``
and ``sinusoid``.

Importing this package imports none of them; each registers itself (with
:func:`metaopt.runner.experiment.register_experiment`) when its module is imported,
and :func:`metaopt.runner.builtins.register_builtins` imports the list of built-ins.
"""
