"""Attacks x defenses: every attack trained on one dataset, every defense run on each model.

``get_config(variant)`` returns a table config:

* ``attacks.<name>``: the full training config of each attack (a ``configs/badnets.py``
  variant), so any setting of one attack is overridable, e.g.
  ``--config.attacks.wanet.train.epochs=30``;
* ``shared``: settings applied to every attack when not ``None`` (the dataset file, the
  subset sizes, the epochs, the seed), so all models see the same data;
* ``table.attacks`` / ``table.defenses``: which rows and columns to run, in order;
* ``defenses``: the defense settings (``backdoor_jax/configs/defenses.py``) with
  Neural Cleanse's unlearning switched on, so it is both a detector and a removal.

Run by ``launch/sweep.py`` (a config with a ``table`` section is a table, not a grid).
"""
from __future__ import annotations

from ml_collections import config_dict

from backdoor_jax.configs import badnets
from backdoor_jax.configs import defenses as defenses_config
from backdoor_jax.errors import ConfigError

# Row name -> the configs/badnets.py variant suffix ('' = the base variant).
ATTACKS = {"clean": "", "badnets": "", "blend": "blend", "filter": "filter", "moire": "moire", "wanet": "wanet",
           "label_consistent": "label_consistent", "ssba": "ssba"}
DEFENSES = ("fine_pruning", "neural_cleanse", "activation_clustering", "spectral", "strip", "tv_denoise")
VARIANTS = ("gtsrb", "digits")


def attack_config(base: str, name: str) -> config_dict.ConfigDict:
  """The training config of attack ``name`` on ``base`` ('digits' or 'gtsrb')."""
  if name not in ATTACKS:
    raise ConfigError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
  suffix = ATTACKS[name]
  c = badnets.get_config(f"{base}_{suffix}" if suffix else base)
  if name == "clean":
    c.poison.rate = 0.0  # the reference model; its "ASR" is the trigger's natural flip rate
  if name == "ssba":
    c.trigger.ssba.path = "cache/ssba_encoder.npz"  # relative paths live in the table's work dir
  if name == "label_consistent":
    c.poison.surrogate_path = "cache/adversarial_surrogate.msgpack"
  return c


def get_config(variant: str = "gtsrb") -> config_dict.ConfigDict:
  """Returns the table config of one variant (see ``configs/attacks_x_defenses.py``)."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown variant {variant!r} of configs/attacks_x_defenses.py; allowed: {', '.join(VARIANTS)}")
  c = config_dict.ConfigDict()
  c.table = config_dict.ConfigDict()
  c.table.attacks = tuple(ATTACKS)
  c.table.defenses = DEFENSES
  # SSBA's encoder is trained once into the work dir when its file is missing, with these
  # arguments of backdoor_jax.triggers.ssba_train.train_encoder_file.
  c.table.ssba = config_dict.ConfigDict({"steps": 1000, "num_bits": 16, "max_residual": 8.0})

  c.attacks = config_dict.ConfigDict({name: attack_config(variant, name) for name in ATTACKS})

  s = c.shared = config_dict.ConfigDict()
  s.seed = config_dict.placeholder(int)
  s.data = config_dict.ConfigDict()
  s.data.path = config_dict.placeholder(str)
  s.data.max_train = config_dict.placeholder(int)
  s.data.max_test = config_dict.placeholder(int)
  s.data.split_seed = config_dict.placeholder(int)
  s.model = config_dict.ConfigDict()
  s.model.name = config_dict.placeholder(str)
  s.model.widths = config_dict.placeholder(tuple)
  s.model.pool_after = config_dict.placeholder(tuple)
  s.train = config_dict.ConfigDict()
  s.train.epochs = config_dict.placeholder(int)
  s.train.batch_size = config_dict.placeholder(int)
  s.train.eval_batch_size = config_dict.placeholder(int)
  s.figures = config_dict.placeholder(bool)

  c.defenses = defenses_config.get_config()
  c.defenses.neural_cleanse.unlearn = True
  c.defenses.strip.max_inputs = 500

  if variant == "gtsrb":
    # Sized for a 2-core CPU (about 10 min per attack with its defenses); the full set
    # is --config.shared.data.max_train=0 --config.shared.data.max_test=0.
    s.data.max_train = 5000
    s.data.max_test = 1500
    s.data.split_seed = 0
    s.train.epochs = 10
    c.defenses.neural_cleanse.epochs = 8
    c.defenses.neural_cleanse.batch_size = 16
  else:  # digits: the embedded offline set, CPU minutes
    s.data.split_seed = 0
    s.train.epochs = 8
    c.table.ssba.steps = 500
  return c
