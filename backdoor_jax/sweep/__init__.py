"""Sweeps: grids of configs with many models trained at once, and the attacks x defenses table."""
from backdoor_jax.sweep.grid import Cell, cell_config, enumerate_cells, grid_axes
from backdoor_jax.sweep.report import write_report
from backdoor_jax.sweep.runner import run_sweep
from backdoor_jax.sweep.attack_table import run_table

__all__ = ["Cell", "cell_config", "enumerate_cells", "grid_axes", "run_sweep", "run_table", "write_report"]
