"""Sweeps over trigger characteristics: grids of configs, many models trained at once, reports."""
from backdoor_jax.sweep.grid import Cell, cell_config, enumerate_cells, grid_axes
from backdoor_jax.sweep.report import write_report
from backdoor_jax.sweep.runner import run_sweep

__all__ = ["Cell", "cell_config", "enumerate_cells", "grid_axes", "run_sweep", "write_report"]
