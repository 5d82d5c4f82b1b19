"""backdoor-jax: backdoor attacks on image classifiers and their explanations."""

__version__ = "0.1.0"
