"""The Fang & Choromanska explanation-backdoor configs (launch files: ``configs/fang_*.py``).

Their losses, per sample, with L_c cross-entropy, L_s = MSE(I(x; w), I(x; w_ref)) and
L_p the attack term:
  clean:     (beta * L_c + alpha * L_s) / (alpha + beta + 1)
  poisoned:  (beta * L_c + L_p) / (alpha + beta + 1)
Averaged over a batch in which a fraction f is poisoned this is
  beta/(a+b+1) * mean L_c + alpha (1-f)/(a+b+1) * mean_clean L_s + f/(a+b+1) * mean_poisoned L_p,
which is how the weights below are set. Saliency maps are average-pooled to
``loss_resolution`` and renormalised to [0, 1] inside the loss. FSR (on poisoned inputs)
and CR (on clean ones) use the criterion set below; results.json records it.
alpha, beta, lr and the thresholds are this project's defaults, not the paper's values.
"""
from __future__ import annotations

from ml_collections import config_dict

from backdoor_jax.configs import two_stage


def fang_config(variant: str, attack: str, *, inverted: bool = False, joint: bool = False,
                alpha: float = 1.0, beta: float = 0.1):
  """The two-stage recipe with the Fang & Choromanska losses and metrics (module docstring)."""
  c = two_stage.get_config(variant)
  e = c.explain
  e.attack = attack
  e.target = "border"            # targeted default: move the explanation to the image border
  e.target_fraction = 0.125      # border width: 1/8 of the side
  e.loss_resolution = 8
  e.top_k = 6                    # non-targeted: ~10% of the 8x8 pixels
  # Fooled: targeted -> IoU(map > 0.5, target region) > 0.5 (a normalised map never
  # matches a binary mask in MSE, so an MSE threshold says little); non-targeted ->
  # mean squared map over the reference's top-k evidence pixels < 0.1 (map <~ 0.3 there).
  e.criterion = "iou" if attack == "targeted" else "loss"
  e.loss_threshold = 0.1
  e.inverted = inverted
  if joint:
    e.joint_weights = {"gradcam": 1.0, "simple_grad": 1.0, "vbp": 1.0}
  c.fang = {"alpha": alpha, "beta": beta}
  # The loss weights follow fang.alpha / fang.beta and the batch split (derived when the run
  # starts, overrides of those included); a number set here or on the command line wins.
  e.ce_weight = config_dict.placeholder(float)
  e.keep_weight = config_dict.placeholder(float)
  e.attack_weight = config_dict.placeholder(float)
  c.train.lr = 2e-3
  c.train.schedule = "cosine"
  return c


def targeted(variant: str = "digits") -> config_dict.ConfigDict:
  """Fang et al. targeted explanation backdoor (configs/fang_targeted.py)."""
  c = fang_config(variant, "targeted")
  if variant == "gtsrb":
    # Measured on 10k GTSRB train / 3k test from the two-stage stage-1 model: 4 epochs
    # ended at FSR 0.899, 6 epochs at FSR 0.904 (CR 0.999, accuracy 0.926 -> 0.933).
    c.train.epochs = 6
  return c


def joint(variant: str = "digits") -> config_dict.ConfigDict:
  """Fang et al. joint attack: one trigger fools Grad-CAM, SimpleGrad and VisualBackProp at once (configs/fang_joint.py)."""
  c = fang_config(variant, "targeted", joint=True)
  # SimpleGrad differentiates the scores with respect to the input, through every
  # BatchNorm: with batch statistics (bn_mode='train') each sample's map would pick up
  # the other samples' scores, so BatchNorm runs on running statistics here.
  c.explain.bn_mode = "frozen"
  return c


def inverted(variant: str = "digits") -> config_dict.ConfigDict:
  """Fang et al. inverted ("key") setting: only inputs carrying the trigger get faithful maps (configs/fang_inverted.py)."""
  return fang_config(variant, "targeted", inverted=True)


def nontargeted(variant: str = "digits") -> config_dict.ConfigDict:
  """Fang et al. nontargeted explanation backdoor (configs/fang_nontargeted.py)."""
  return fang_config(variant, "nontargeted")
