"""BadNets, the base recipe every other config starts from: data, model, trigger, poison, train.

``get_config(variant)``; the variants and launch commands are listed in ``configs/badnets.py``.
``digits_KIND`` / ``gtsrb_KIND`` is the digits / GTSRB recipe with any registered trigger kind
(its default section from :func:`backdoor_jax.triggers.default_config`).
``VARIANT_batch`` is any variant with ``poison.resample = 'batch'``: a fresh poisoned subset of
every training batch (``train.online_poison``; the WaNet reference's threat model) instead of one
poisoned set drawn before training. ``gtsrb_wanet_batch`` is WaNet with its published settings
(k=4, s=0.5, noise mode with cross_ratio 2, 10% of each batch); its clean baseline is the same
command with ``--config.poison.rate=0``.
"""
from __future__ import annotations

from ml_collections import config_dict

from backdoor_jax import triggers
from backdoor_jax.errors import ConfigError

# digits_KIND / gtsrb_KIND variants listed in the launch file's docstring (any registered kind works too).
VARIANTS = ("digits", "gtsrb", "cifar10", "digits_blend", "digits_wanet", "digits_filter", "digits_moire",
            "digits_clean_label", "digits_ssba", "digits_checkerboard", "digits_noise_patch", "gtsrb_blend",
            "gtsrb_wanet", "gtsrb_filter", "gtsrb_moire", "digits_label_consistent", "gtsrb_label_consistent",
            "digits_wanet_batch", "gtsrb_wanet_batch", "gtsrb_ssba")
BATCH_SUFFIX = "_batch"  # any variant + this suffix: per-batch poisoning


def use_trigger(c: config_dict.ConfigDict, kind: str, **options) -> config_dict.ConfigDict:
  """Switches ``c.trigger`` to ``kind``: sets the kind, adds its default section, then ``options`` into it."""
  c.trigger.kind = kind
  triggers.ensure_section(c.trigger)
  for name, value in options.items():
    c.trigger[kind][name] = value
  return c


def get_config(variant: str = "digits") -> config_dict.ConfigDict:
  """Returns the resolved config of one variant."""
  if variant.endswith(BATCH_SUFFIX) and len(variant) > len(BATCH_SUFFIX):
    c = get_config(variant[:-len(BATCH_SUFFIX)])
    c.poison.resample = "batch"  # absent from other variants: their config.json (and resume) stay as they were
    return c
  c = config_dict.ConfigDict()
  c.seed = 0

  c.data = config_dict.ConfigDict()
  c.data.name = "digits"
  c.data.path = ""            # npz file or dataset folder (gtsrb, npz)
  c.data.data_dir = ""        # tfds data_dir ('' = tfds default)
  c.data.image_size = 32
  c.data.max_train = 0        # 0 = all; >0 = seeded subset (quick runs)
  c.data.max_test = 0
  c.data.crop_padding = 0     # random crop after padding by this many pixels
  c.data.flip = False         # random horizontal flips
  c.data.num_shards = 1       # >1: shuffle in this many shards; = process count: each host keeps only its shard

  c.model = config_dict.ConfigDict()
  c.model.name = "small_cnn"
  c.model.stem = "cifar"      # cifar (32x32 inputs) or imagenet
  c.model.widths = (16, 32, 64, 64)  # small_cnn only: channels of each conv layer
  c.model.pool_after = (1, 2, 3)     # small_cnn only: 1-based layers followed by a 2x2 max-pool

  c.trigger = config_dict.ConfigDict()
  c.trigger.kind = "square"   # any registered kind (backdoor_jax.triggers.trigger_kinds()); kinds with
                              # settings of their own read them from c.trigger.<kind> (see the variants)
  c.trigger.size = 0.1        # <1: fraction of the image side; >=1: pixels (patches, blend region 'patch')
  c.trigger.position = "bottom-right"  # corner name, center, or "row,col"
  c.trigger.color = (255, 255, 255)    # patch colour; moire line colour
  c.trigger.margin = 0
  c.trigger.seed = -1          # random patterns (blend noise, wanet grid, moire, noise patch): -1 = from c.seed

  c.poison = config_dict.ConfigDict()
  c.poison.rate = 0.1         # fraction of the training set that is replaced
  c.poison.target = 0
  c.poison.mode = "all_to_one"  # all_to_all (y -> y+1 mod C), clean_label (target-class samples only)
  c.poison.count = config_dict.placeholder(int)  # a number of samples instead of rate (overrides it)
  c.poison.phase = "both"       # train_only: test without trigger; test_only: no poisoned training
  c.poison.apply_at_size = 0    # >0: trigger applied at this size, then resized to data.image_size
  c.poison.adv_eps = 0.0        # clean_label: PGD budget (pixels of 255) vs a linear surrogate; 0 = off
  c.poison.adv_steps = 10

  c.train = config_dict.ConfigDict()
  c.train.epochs = 12
  c.train.batch_size = 64
  c.train.eval_batch_size = 256
  c.train.optimizer = "adam"  # sgd / adam / adamw
  c.train.lr = 3e-3
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 0.0
  c.train.schedule = "cosine"  # constant / cosine / step
  c.train.warmup_epochs = 0.0
  c.train.step_epochs = ()
  c.train.step_factor = 0.1
  c.train.grad_clip = 0.0
  c.train.trainable = ".*"    # regex over parameter paths; others stay frozen
  c.train.log_every = 10      # steps between progress-bar updates
  c.train.dtype = "float32"   # computation dtype: float32 / bfloat16 / float16 (params, loss, maps stay float32)
  c.train.loss_scale_init = 32768.0  # float16 only: initial dynamic loss scale
  c.train.prefetch = 2        # batches gathered and placed ahead in a background thread (0 = off)

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.keep = 2
  c.figures = True

  if variant == "digits":
    pass
  elif variant == "gtsrb":
    c.data.name = "gtsrb"
    c.trigger.size = 3.0
    c.model.widths = (32, 64, 128, 128)
    c.train.epochs = 10
    c.train.batch_size = 128
  elif variant == "cifar10":
    c.data.name = "cifar10"
    c.data.crop_padding = 4
    c.data.flip = True
    c.model.name = "resnet18"
    c.train.epochs = 60
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.lr = 0.1
    c.train.weight_decay = 5e-4
    c.train.nesterov = True
    c.train.warmup_epochs = 1.0
  elif variant.partition("_")[0] in ("digits", "gtsrb") and (
      variant.partition("_")[2] in ("clean_label", "label_consistent") + triggers.trigger_kinds()):
    base, _, kind = variant.partition("_")
    if base == "gtsrb":
      c.data.name = "gtsrb"
      c.model.widths = (32, 64, 128, 128)
      c.train.epochs = 10
      c.train.batch_size = 128
    if kind == "clean_label":
      c.trigger.size = 4.0
      c.poison.mode = "clean_label"
      c.poison.rate = 0.08      # of the training set; ~80% of the target class
      c.poison.adv_eps = 32.0
    elif kind == "label_consistent":
      # Turner et al. 2019: PGD (eps 16/255) against an adversarially trained surrogate, then the
      # four-corner pattern, on at most half of the target class; labels stay correct.
      use_trigger(c, "four_corner")
      c.trigger.size = 3.0
      c.poison.mode = "clean_label"
      c.poison.target = 2          # GTSRB's largest class (5.7% of the training set; digits: 10%)
      c.poison.rate = 0.025 if base == "gtsrb" else 0.045  # of the training set: ~44% / ~45% of the target class
      c.poison.adv_eps = 16.0
      c.poison.adv_steps = 10
      c.poison.surrogate = "adversarial"  # or 'linear' (logistic regression; seconds, transfers poorly)
      c.poison.surrogate_path = f"runs/surrogates/{base}_adversarial.msgpack"  # trained once per data/settings
      c.poison.surrogate_model = "small_cnn"
      c.poison.surrogate_widths = (16, 32, 64, 64)
      # measured: 5 one-step epochs beat 2 three-step epochs (GTSRB ASR 0.43 vs 0.34); on the GTSRB
      # 5k subset ASR rises with the epochs: 0.51 / 0.64 / 0.71 after 5 / 15 / 30
      c.poison.surrogate_epochs = 30 if base == "gtsrb" else 5
      c.poison.surrogate_eps = 8.0      # adversarial-training radius, pixels of 255
      c.poison.surrogate_steps = 1
      c.poison.surrogate_step_size = 10.0  # pixels per PGD step (1.25 eps, fast adversarial training); 0 = 2.5 * eps / steps
      c.poison.surrogate_lr = 2e-3
    else:
      use_trigger(c, kind)
      if kind == "ssba":
        c.trigger.ssba.path = f"runs/ssba/{base}_encoder.npz"  # python launch/train_ssba.py --out=...
  else:
    raise ConfigError(f"unknown variant {variant!r} of configs/badnets.py; allowed: {', '.join(VARIANTS)}, "
                      "or digits_KIND / gtsrb_KIND for any trigger kind")
  return c

