"""Benchmarks: JAX against a PyTorch reference on the same device, and the prepared GPU run.

One command line, ``python -m benchmarks <command>`` from the repository root (see
``benchmarks/__main__.py`` and ``benchmarks/README.md``). The workload modules
(``train_throughput``, ``gradcam_throughput``, ``explanation_step``, ``ensemble_throughput``,
``neural_cleanse_vmap``) define no flags: they hold a ``Job`` and the functions that
measure it, which the CLI and ``python -m benchmarks.worker`` call.
"""
