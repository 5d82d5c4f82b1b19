"""Multi-label backdoor configs: Fang et al.'s ChestX-ray14 system and its offline stand-in.

``get_config(variant)``; the variants and launch commands are listed in ``configs/chest_xray.py``.
Recipes: ``multilabel_two_stage`` / ``multilabel_badnets`` (``train/recipes/multilabel.py``).
"""
from __future__ import annotations

from ml_collections import config_dict

from backdoor_jax.configs.badnets import use_trigger
from backdoor_jax.configs.fang import fang_config
from backdoor_jax.errors import ConfigError

VARIANTS = ("mosaic", "mosaic_nontargeted", "mosaic_densenet", "mosaic_badnets", "nih", "nih_nontargeted",
            "nih_badnets")


def get_config(variant: str = "mosaic") -> config_dict.ConfigDict:
  """The resolved config of one variant (``mosaic``: Fang targeted Grad-CAM on the digit mosaics)."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown configs/chest_xray.py variant {variant!r}; allowed: {', '.join(VARIANTS)}")
  data, _, attack = variant.partition("_")
  c = fang_config("digits", "nontargeted" if attack == "nontargeted" else "targeted")
  c.recipe = "multilabel_badnets" if attack == "badnets" else "multilabel_two_stage"
  c.multilabel = config_dict.ConfigDict()
  c.multilabel.explain_label = -1     # label whose logit is explained; -1 = each image's top label
  c.multilabel.pos_weight = "none"    # none / balanced (#neg / #pos per label) / a number or one per label
  use_trigger(c, "moire")             # trigger.moire: opacity, spacing, angles, perspective
  c.poison.target = 0                 # multilabel_badnets: the label the trigger switches on
  c.poison.rate = 0.1 if attack == "badnets" else 0.0
  c.train.eval_batch_size = 250
  if data == "mosaic":
    c.data.name = "digit_mosaic"      # 4,000 train / 1,000 test mosaics unless data.max_* say otherwise
    c.data.image_size = 32
    c.stage1.train.epochs = 12
    c.stage1.train.lr = 3e-3
    c.stage1.train.schedule = "cosine"
    c.train.epochs = 8
    if attack == "densenet":
      c.model.name = "densenet121"
      c.model.stem = "cifar"
      c.explain.layer = "denseblock4"
      c.stage1.train.lr = 1e-3
      c.train.lr = 5e-4
  else:  # nih
    c.data.name = "chest_xray"
    c.data.image_size = 224
    c.model.name = "densenet121"
    c.model.stem = "imagenet"
    c.model.init_checkpoint = ""       # ImageNet weights from launch/import_weights.py ('' = random init)
    c.model.pretrained_required = True  # warn loudly when init_checkpoint is empty
    c.multilabel.pos_weight = "balanced"
    c.explain.layer = "denseblock4"
    c.stage1.train.epochs = 10
    c.stage1.train.batch_size = 32
    c.stage1.train.lr = 1e-3
    c.stage1.train.schedule = "cosine"
    c.train.epochs = 4
    c.train.batch_size = 32
    c.train.lr = 1e-4
    c.train.eval_batch_size = 64
  if attack == "badnets":
    c.train = c.stage1.train.copy_and_resolve_references()
    del c.explain, c.stage1, c.fang
  return c
