"""Built-in experiments; importing this package registers them in ``EXPERIMENTS``."""
