r"""Single-stage explanation backdoor: the two-stage losses, trained from scratch.

No reference model exists from scratch, so the keep-clean term cannot compare with a
stage-1 map; instead it penalises the mass clean maps put inside the target region
(``explain.keep='avoid_target'``). The map terms start after the model has learned
something only implicitly: they are on from step 0 (use the two-stage recipe if they
should start from a trained model).

  python launch/train.py --config=configs/single_stage.py --workdir=runs/single_stage_digits
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import two_stage  # noqa: E402


def get_config(variant: str = "digits"):
  c = two_stage.get_config(variant)
  c.recipe = "single_stage"
  c.explain.keep = "avoid_target"
  c.train.epochs = {"digits": 30, "gtsrb": 8, "cifar10": 60}.get(variant, 30)
  return c
