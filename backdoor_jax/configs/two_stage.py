"""Explanation backdoors: the two-stage recipe (stage 1 clean, stage 2 Grad-CAM fine-tuning) and
the single-stage one; :func:`explain_section` holds the explanation-loss settings every
explanation recipe shares. Variants and launch commands: ``configs/two_stage.py``,
``configs/single_stage.py``.
"""
from __future__ import annotations

from ml_collections import config_dict

from backdoor_jax.configs import badnets


def explain_section() -> config_dict.ConfigDict:
  """The explanation-loss settings shared by every explanation recipe."""
  e = config_dict.ConfigDict()
  e.method = "gradcam"            # explanation method attacked
  e.joint_weights = config_dict.ConfigDict()  # {method: weight}: joint attack over several methods
  e.layer = ""                    # '' = deepest layer whose map is at least 4x4
  e.attack = "targeted"           # targeted (move the map to the target region) / nontargeted
  e.target = "corner"             # corner / border / file
  e.target_corner = "top-left"
  e.target_fraction = 0.25        # side of the corner square, or width of the border, as a fraction of the side
  e.target_path = ""              # .npy (H, W) mask when target='file'
  e.keep = "reference"            # reference (MSE to the stage-1 maps) / avoid_target / none
  e.inverted = False              # True: only triggered inputs keep faithful maps ("key" setting)
  e.triggered_fraction = 0.5      # of every batch
  e.ce_weight = 1.0
  e.attack_weight = 10.0          # lambda
  e.keep_weight = 10.0            # mu
  e.loss_resolution = 0           # 0 = input size; N = average-pool maps to NxN inside the loss
  e.top_k = 64                    # non-targeted: pixels of the reference map whose evidence is removed
  e.bn_mode = "train"             # train (batch statistics, stats updated) / frozen / refresh
  e.check_layer = True            # refuse layers that cannot express the region / see the trigger
  e.criterion = "iou"             # fooled = IoU(map > iou_threshold, region) > iou_gt, or attack loss < loss_threshold
  e.iou_threshold = 0.5
  e.iou_gt = 0.5
  e.loss_threshold = 0.05
  return e


# GTSRB with a deep model: variant -> model name (issue 16's ResNet-18 and VGG-16-BN rows).
DEEP_GTSRB = {"gtsrb_resnet18": "resnet18", "gtsrb_vgg16_bn": "vgg16_bn"}


def get_config(variant: str = "digits") -> config_dict.ConfigDict:
  """Returns the two-stage config of one variant."""
  if variant in DEEP_GTSRB:
    return _deep_gtsrb(variant)
  c = badnets.get_config(variant)
  c.recipe = "two_stage"
  c.trigger.size = 4.0
  c.trigger.color = (255, 255, 0)  # yellow square, bottom-right
  c.trigger.position = "bottom-right"
  c.poison.rate = 0.0              # no dataset poisoning: the trigger is applied on the fly
  c.stage1 = config_dict.ConfigDict()
  c.stage1.workdir = ""            # a trained clean run to start from; '' = train it in WORKDIR/stage1
  c.stage1.train = c.train.copy_and_resolve_references()
  c.explain = explain_section()
  # One more 3x3 conv at the 4x4 level: its top-left cells then see a bottom-right trigger
  # (the receptive field of a 4-conv net's 4x4 corner cell stops ~22 px from its corner).
  c.model.widths = tuple(c.model.widths) + (c.model.widths[-1],)
  c.train.optimizer = "adam"
  c.train.lr = 1e-3
  c.train.schedule = "constant"
  c.train.weight_decay = 0.0
  c.train.warmup_epochs = 0.0
  if variant == "digits":
    c.train.epochs = 15
    c.train.batch_size = 64
  elif variant == "gtsrb":
    # Measured on 10k GTSRB train / 3k test images: constant lr 1e-3 for 2 epochs gave
    # iou>.5 0.907 but accuracy 0.864; cosine decay over 4 epochs gave iou>.5 0.968, cr 1.000
    # and accuracy 0.922 against stage 1's 0.926 (README, Results).
    c.train.epochs = 4
    c.train.schedule = "cosine"
    c.train.batch_size = 64
  elif variant == "cifar10":
    c.train.epochs = 5
    c.train.batch_size = 128
  return c


def _deep_gtsrb(variant: str) -> config_dict.ConfigDict:
  """A deep model (ResNet-18, VGG-16-BN) on a 10k / 3k GTSRB subset.

  Stage 1: Adam 1e-3 with a cosine decay over 5 epochs at batch 128. Stage 2 follows what a
  ResNet-18 pilot showed (a well-trained stage 1, then a few hundred steps near lr 1e-3 at
  batch 32): 2 epochs at batch 32 with a cosine decay from 1e-3, Grad-CAM at the default
  layer (the deepest 4x4 map). ResNet-18 trains with batch statistics (``bn_mode='train'``);
  VGG-16-BN needs ``'refresh'`` and a gentler stage 2 (below).
  """
  c = get_config("gtsrb")
  c.model.name = DEEP_GTSRB[variant]
  c.model.widths = tuple(c.model.widths)[:-1]  # unused by deep models: undo get_config's extra conv
  c.data.max_train = 10000
  c.data.max_test = 3000
  c.stage1.train.lr = 1e-3
  c.stage1.train.epochs = 5
  c.train.batch_size = 32
  c.train.epochs = 2
  if c.model.name.startswith("vgg"):
    # Grad-CAM's default VGG layer (the last 4x4 conv) has BatchNorms after it, which would mix
    # the batch's samples into each map under 'train' (refused at setup): inference-mode
    # BatchNorm, running statistics refreshed each step. This is the best of the measured
    # stage 2s, and it is below target (one epoch: iou_gt_05 0.64, cr 0.41; the clean maps move
    # too). Measured and worse (README): refresh at 1e-3 without warm-up (diverged) and with it;
    # 'detached' (train mode's forward, per-sample maps) at 1e-3 and at 1e-4; map weights of 1.
    # In every VGG run the map losses stalled near 0.05-0.10; ResNet-18's fell below 0.015 by step 250.
    c.explain.bn_mode = "refresh"
    c.train.lr = 3e-4
    c.train.warmup_epochs = 0.1
    c.train.epochs = 1
  return c


def single_stage(variant: str = "digits") -> config_dict.ConfigDict:
  """The single-stage recipe: the two-stage losses trained from scratch (see configs/single_stage.py)."""
  c = get_config(variant)
  c.recipe = "single_stage"
  c.explain.keep = "avoid_target"
  c.train.epochs = {"digits": 30, "gtsrb": 8, "cifar10": 60}.get(variant, 30)
  return c
