"""Backdoor defenses, each ``run(ctx, out_dir) -> report dict``, and the report writer.

Usage::

  from backdoor_jax import defenses
  rec = defenses.defend_run("runs/digits", "neural_cleanse", defenses.default_config())

``DEFENSES`` maps a name to its ``run`` function; see ``report.defend_run`` for the
files written (``WORKDIR/defenses/NAME/report.json`` plus figures).
"""
from backdoor_jax.defenses.registry import DEFENSES, NAMES
from backdoor_jax.defenses.report import default_config, defend_all, defend_run

__all__ = ["DEFENSES", "NAMES", "default_config", "defend_all", "defend_run"]
