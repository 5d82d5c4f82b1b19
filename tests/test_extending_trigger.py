"""docs/extending.md, "A new trigger": trigger kinds defined outside the library, registered, run end to end."""
from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backdoor_jax import experiment, poison, triggers
from backdoor_jax.configs import badnets
from backdoor_jax.errors import ConfigError
from backdoor_jax.train import recipes
from tests.helpers import tiny_config


# --- the worked example, as a user would write it in their own file -------------------------
@triggers.register_trigger("frame", defaults={"width": 1})
def build_frame(args: triggers.TriggerArgs) -> triggers.Trigger:
  """A frame ``trigger.frame.width`` pixels wide along the image border, in the common ``color``."""
  h, w = args.image_hw
  width = args.options["width"]
  if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= min(h, w) // 2:
    raise ConfigError(f"trigger frame.width {width!r} is invalid; allowed: an int in [1, {min(h, w) // 2}]")
  mask = np.ones((h, w, 1), np.float32)
  mask[width:h - width, width:w - width] = 0.0
  rgb = triggers.parse_color("white" if args.color is None else args.color)
  return triggers.Trigger(pattern=jnp.asarray(mask * np.asarray(rgb, np.float32)), mask=jnp.asarray(mask))


# A kind with its own transform and a cross mode (the poisoning hook WaNet's noise mode uses).
@chex.dataclass(frozen=True)
class ShiftTrigger(triggers.TriggerBase):
  """Brightens the whole image by ``delta``; cross samples are darkened by a random fraction of it."""
  delta: jax.Array

  KIND = "shift"

  @property
  def has_cross_mode(self) -> bool:
    return True

  def apply_cross(self, images, keys):
    u = jax.vmap(jax.random.uniform)(keys)  # one number in [0, 1) per image
    return triggers.apply_trigger(ShiftTrigger(delta=-self.delta * u[:, None, None, None]), images)

  def _apply_float(self, x):
    return x + self.delta


@triggers.register_trigger("shift", defaults={"delta": 40.0, "cross_ratio": 1.0},
                           cross_ratio=lambda options: options["cross_ratio"])
def build_shift(args: triggers.TriggerArgs) -> ShiftTrigger:
  return ShiftTrigger(delta=jnp.asarray(args.options["delta"], jnp.float32))
# --------------------------------------------------------------------------------------------


def test_frame_exact_pixels_region_and_errors():
  cfg = {"kind": "frame", "color": "red", "frame": {"width": 2}}
  trig = triggers.trigger_from_config(cfg, (8, 9))
  x = np.full((2, 8, 9, 3), 100, np.uint8)
  out = np.asarray(triggers.apply_trigger(trig, x))
  inside = np.zeros((8, 9), bool)
  inside[2:6, 2:7] = True
  np.testing.assert_array_equal(out[:, inside], x[:, inside])
  assert (out[:, ~inside] == (255, 0, 0)).all()
  np.testing.assert_array_equal(triggers.trigger_region(trig), ~inside)
  with pytest.raises(ConfigError, match="frame.width 5 is invalid"):
    triggers.trigger_from_config({"kind": "frame", "frame": {"width": 5}}, (8, 9))
  with pytest.raises(ConfigError, match="needs the section trigger.frame"):
    triggers.trigger_from_config({"kind": "frame"}, (8, 9))
  assert badnets.get_config("digits_frame").trigger.frame.width == 1  # the variant exists once registered


def test_frame_trains_end_to_end(tmp_path):
  c = tiny_config(**{"trigger.kind": "frame", "trigger.frame.width": 2, "train.epochs": 1, "data.max_train": 96,
                     "data.max_test": 64})
  res = recipes.run(c, str(tmp_path))  # what launch/train.py runs
  assert res["num_poisoned"] == 10 and 0 <= res["attack_success_rate"] <= 1 and 0 <= res["clean_accuracy"] <= 1
  assert json.loads((tmp_path / "config.json").read_text())["trigger"]["frame"] == {"width": 2}
  exp = experiment.build_experiment(c)  # what the run trained on: frames on the poisoned images only
  np.testing.assert_array_equal(exp.train_images[exp.is_poisoned],
                                triggers.apply_trigger(exp.trigger, exp.dataset.train_images[exp.is_poisoned]))
  assert (exp.train_images[exp.is_poisoned][:, :2] == 255).all()


def test_cross_mode_hook_reaches_the_poisoned_set():
  c = tiny_config(**{"trigger.kind": "shift", "poison.count": 10, "data.max_train": 200})
  c.trigger.shift.cross_ratio = 2.0
  assert triggers.cross_ratio_from_config(c.trigger) == 2.0
  exp = experiment.build_experiment(c)
  images, labels = exp.dataset.train_images, exp.dataset.train_labels
  key = experiment.run_keys(c.seed)["poison"]
  idx = np.flatnonzero(exp.is_poisoned)
  cross = poison.choose_cross_indices(jax.random.fold_in(key, 1), len(labels), idx, 2.0)
  assert len(idx) == 10 and len(cross) == 20
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(key, 2), jnp.asarray(cross, jnp.uint32))
  np.testing.assert_array_equal(exp.train_images[cross], exp.trigger.apply_cross(images[cross], keys))
  np.testing.assert_array_equal(exp.train_labels[cross], labels[cross])  # cross samples keep their labels
  assert (exp.train_images[cross].astype(int) <= images[cross]).all()
  np.testing.assert_array_equal(exp.train_images[idx], triggers.apply_trigger(exp.trigger, images[idx]))
  rest = np.setdiff1d(np.arange(len(labels)), np.concatenate([idx, cross]))
  np.testing.assert_array_equal(exp.train_images[rest], images[rest])
