"""Backdoor defenses, each registered with its run function, config section and summary row.

Usage::

  from backdoor_jax import defenses
  rec = defenses.defend_run("runs/digits", "neural_cleanse", defenses.default_config())

``DEFENSES`` is a read-only view name -> ``registry.Defense`` (``NAMES`` its keys);
``registry.register`` adds one (see ``docs/extending.md``). ``report.defend_run`` lists
the files written (``WORKDIR/defenses/NAME/report.json`` plus figures). Importing this
package registers the built-in defenses (the imports below, in registry order).
"""
from backdoor_jax.defenses import registry
from backdoor_jax.defenses import neural_cleanse, activation_clustering, spectral, fine_pruning, strip, tv_denoise
from backdoor_jax.defenses import bn_reestimate, map_probe  # noqa: F401  (explanation-backdoor defenses)
from backdoor_jax.defenses.registry import DEFENSES, NAMES, Defense
from backdoor_jax.defenses.report import default_config, defend_all, defend_run

__all__ = ["DEFENSES", "NAMES", "Defense", "default_config", "defend_all", "defend_run", "registry"]
