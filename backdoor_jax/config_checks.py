"""Value checks of whole configs, before any data is loaded: one table of rules.

Every numeric leaf (ints, floats, and the numbers inside tuples/lists) must be finite.
Then each rule ``(key pattern, predicate, allowed)`` of :data:`TRAIN_RULES` (training,
sweep and explanation-recipe configs) or :data:`DEFENSE_RULES` (``configs/defenses.py``)
is applied to every leaf whose dotted key matches the pattern. A pattern matches the
*last* segments of a key (``train.lr`` matches ``train.lr`` and ``stage1.train.lr``)
unless it starts with ``^`` (anchored at the top level); segments may use ``fnmatch``
wildcards (``*batch_size``). Values listed in a sweep grid (``sweep.grid.train.lr =
(0.1, nan)``) are checked element by element against the rules of the key they set.

Keys that a rule names but a config lacks are simply not checked, so one table serves
every recipe.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Any, Callable, Iterator, NamedTuple

from ml_collections import config_dict

from backdoor_jax.errors import ConfigError

MAX_SEED = 2 ** 32 - 1
SWEEP_GRID = "sweep.grid."
TABLE_SHARED = "shared."  # attacks x defenses tables: None there means "each attack keeps its own value"


class Rule(NamedTuple):
  """``predicate(value)`` must hold for every leaf whose key matches ``pattern``."""
  pattern: str
  predicate: Callable[[Any], bool]
  allowed: str


def _number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _at_least(low: float, integer: bool = False) -> Callable[[Any], bool]:
  return lambda v: (_int(v) if integer else _number(v)) and v >= low


def _positive(v: Any) -> bool:
  return _number(v) and v > 0


def _within(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Callable[[Any], bool]:
  def ok(v: Any) -> bool:
    if not _number(v):
      return False
    return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
  return ok


def _seed(derive_ok: bool) -> Callable[[Any], bool]:
  return lambda v: _int(v) and (0 <= v <= MAX_SEED or (derive_ok and v == -1))


def _each(predicate: Callable[[Any], bool], non_empty: bool = False) -> Callable[[Any], bool]:
  def ok(v: Any) -> bool:
    if not isinstance(v, (tuple, list)):
      return False
    return (len(v) > 0 or not non_empty) and all(predicate(x) for x in v)
  return ok


def _optional(predicate: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda v: v is None or predicate(v)


_SEED_TEXT = f"an integer in 0..{MAX_SEED}"
_DERIVED_SEED_TEXT = f"-1 (derive from the run's seed) or an integer in 0..{MAX_SEED}"
_FRACTION = "a number in [0, 1]"

# Rules every config may meet (all recipes and the defense settings).
_COMMON_RULES: tuple[Rule, ...] = (
    Rule("*batch_size", _at_least(1, integer=True), "an integer >= 1"),
    Rule("*_lr", _positive, "a number > 0"),
    Rule("*.seed", _seed(True), _DERIVED_SEED_TEXT),
    Rule("*split_seed", _seed(True), _DERIVED_SEED_TEXT),
)

TRAIN_RULES: tuple[Rule, ...] = _COMMON_RULES + (
    Rule("^seed", _seed(False), _SEED_TEXT),
    Rule("train.epochs", _at_least(1, integer=True), "an integer >= 1"),
    Rule("train.lr", _positive, "a number > 0"),
    Rule("train.grad_clip", _at_least(0), "a number >= 0 (0 = no clipping)"),
    Rule("train.weight_decay", _at_least(0), "a number >= 0"),
    Rule("train.momentum", _within(0, 1, open_high=True), "a number in [0, 1)"),
    Rule("train.warmup_epochs", _at_least(0), "a number of epochs >= 0"),
    Rule("train.step_epochs", _each(_at_least(0)), "a tuple of epochs >= 0"),
    Rule("train.step_factor", _positive, "a number > 0"),
    Rule("train.loss_scale_init", _positive, "a number > 0"),
    Rule("train.prefetch", _at_least(0, integer=True), "an integer >= 0 (0 = off)"),
    Rule("train.log_every", _at_least(1, integer=True), "an integer >= 1"),
    Rule("checkpoint.keep", _at_least(1, integer=True), "an integer >= 1 (the newest checkpoint is always kept)"),
    Rule("model.widths", _each(_at_least(1, integer=True), non_empty=True),
         "a non-empty tuple of channel counts >= 1, e.g. (16, 32, 64, 64)"),
    Rule("model.pool_after", _each(_at_least(1, integer=True)), "a tuple of 1-based layer indices"),
    Rule("data.image_size", _at_least(0, integer=True), "an integer >= 1 (0 = native size)"),
    Rule("data.max_train", _at_least(0, integer=True), "an integer >= 0 (0 = all)"),
    Rule("data.max_test", _at_least(0, integer=True), "an integer >= 0 (0 = all)"),
    Rule("data.crop_padding", _at_least(0, integer=True), "an integer >= 0"),
    Rule("data.num_shards", _at_least(1, integer=True), "an integer >= 1"),
    Rule("data.num_classes", _at_least(0, integer=True), "an integer >= 0 (0 = the dataset's)"),
    Rule("poison.rate", _within(0, 1), _FRACTION),
    Rule("poison.count", _optional(_at_least(0, integer=True)), "None or an integer >= 0"),
    Rule("poison.target", _at_least(0, integer=True), "a class index >= 0"),
    Rule("poison.adv_eps", _at_least(0), "a number >= 0 (0 = off)"),
    Rule("poison.adv_steps", _at_least(0, integer=True), "an integer >= 0"),
    Rule("poison.apply_at_size", _at_least(0, integer=True), "an integer >= 0 (0 = off)"),
    Rule("explain.*_weight", _optional(_at_least(0)), "a number >= 0 (or None: derived)"),
    Rule("explain.joint_weights.*", _at_least(0), "a number >= 0"),
    Rule("explain.triggered_fraction", _within(0, 1), _FRACTION),
    Rule("explain.target_fraction", _within(0, 1, open_low=True), "a number in (0, 1]"),
    Rule("explain.top_k", _at_least(1, integer=True), "an integer >= 1"),
    Rule("sweep.seeds", _each(_seed(False), non_empty=True), f"a non-empty tuple of integers in 0..{MAX_SEED}"),
    Rule("sweep.models_per_step", _at_least(1, integer=True), "an integer >= 1"),
)

DEFENSE_RULES: tuple[Rule, ...] = _COMMON_RULES + (
    Rule("^seed", _seed(True), _DERIVED_SEED_TEXT),
    Rule("^val_fraction", _within(0, 1, open_low=True, open_high=True), "a number in (0, 1)"),
    Rule("^val_size", _at_least(0, integer=True), "an integer >= 0 (0 = use val_fraction)"),
    Rule("^max_test", _at_least(0, integer=True), "an integer >= 0 (0 = all)"),
    Rule("neural_cleanse.epochs", _at_least(1, integer=True), "an integer >= 1"),
    Rule("neural_cleanse.steps_per_epoch", _at_least(1, integer=True), "an integer >= 1"),
    Rule("neural_cleanse.lr", _positive, "a number > 0"),
    Rule("neural_cleanse.init_cost", _at_least(0), "a number >= 0"),
    Rule("neural_cleanse.cost_multiplier", _within(1, math.inf, open_low=True), "a number > 1"),
    Rule("neural_cleanse.patience", _at_least(1, integer=True), "an integer >= 1"),
    Rule("neural_cleanse.attack_threshold", _within(0, 1, open_low=True), "a number in (0, 1]"),
    Rule("neural_cleanse.anomaly_threshold", _positive, "a number > 0"),
    Rule("neural_cleanse.unlearn_fraction", _within(0, 1, open_low=True), "a number in (0, 1]"),
    Rule("neural_cleanse.unlearn_epochs", _at_least(1, integer=True), "an integer >= 1"),
    Rule("activation_clustering.n_components", _at_least(1, integer=True), "an integer >= 1"),
    Rule("activation_clustering.size_threshold", _within(0, 1, open_low=True, open_high=True), "a number in (0, 1)"),
    Rule("activation_clustering.min_class_size", _at_least(1, integer=True), "an integer >= 1"),
    Rule("spectral.expected_poison_fraction", _within(0, 1, open_low=True), "a number in (0, 1]"),
    Rule("spectral.removal_factor", _positive, "a number > 0"),
    Rule("spectral.retrain_epochs", _at_least(0, integer=True), "an integer >= 0 (0 = the run's epochs)"),
    Rule("fine_pruning.step", _within(0, 1, open_low=True), "a number in (0, 1]"),
    Rule("fine_pruning.max_fraction", _within(0, 1), _FRACTION),
    Rule("fine_pruning.max_val_drop", _at_least(0), "a number >= 0"),
    Rule("fine_pruning.finetune_epochs", _at_least(0, integer=True), "an integer >= 0"),
    Rule("strip.num_overlays", _at_least(1, integer=True), "an integer >= 1"),
    Rule("strip.alpha", _within(0, 1), _FRACTION),
    Rule("strip.frr", _within(0, 1, open_low=True, open_high=True), "a number in (0, 1)"),
    Rule("strip.max_inputs", _at_least(0, integer=True), "an integer >= 0 (0 = all)"),
    Rule("tv_denoise.weights", _each(_at_least(0), non_empty=True), "a non-empty tuple of numbers >= 0"),
    Rule("tv_denoise.iterations", _at_least(1, integer=True), "an integer >= 1"),
    Rule("tv_denoise.max_val_drop", _at_least(0), "a number >= 0"),
)


def flatten(config: config_dict.ConfigDict | dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """``(dotted key, leaf value)`` of every leaf of a (nested) ConfigDict or dict."""
  items = config.items() if isinstance(config, (dict, config_dict.ConfigDict)) else ()
  for key, value in items:
    if isinstance(value, (dict, config_dict.ConfigDict)):
      yield from flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def matches(pattern: str, key: str) -> bool:
  """Whether rule ``pattern`` applies to the dotted ``key`` (see the module docstring)."""
  anchored = pattern.startswith("^")
  want = pattern.lstrip("^").split(".")
  have = key.split(".")
  if len(have) < len(want) or (anchored and len(have) != len(want)):
    return False
  return all(fnmatch.fnmatchcase(h, w) for h, w in zip(have[len(have) - len(want):], want))


def _non_finite(value: Any) -> bool:
  values = value if isinstance(value, (tuple, list)) else (value,)
  return any(_number(v) and not math.isfinite(v) for v in values)


def _check_leaf(key: str, value: Any, rules: tuple[Rule, ...], shown: str) -> None:
  if _non_finite(value):
    raise ConfigError(f"config key {shown} is not finite; allowed: finite numbers only")
  for rule in rules:
    if matches(rule.pattern, key) and not rule.predicate(value):
      raise ConfigError(f"config key {shown} is invalid; allowed: {rule.allowed}")


def check_config(config: config_dict.ConfigDict | dict, rules: tuple[Rule, ...] = TRAIN_RULES) -> None:
  """Raises ConfigError naming the first leaf of ``config`` that breaks a rule.

  Args:
    config: a training/sweep/recipe config (default rules) or, with
      ``rules=DEFENSE_RULES``, the defense settings.
    rules: the rule table.

  Raises:
    ConfigError: one line with the dotted key, its value and what is allowed.
  """
  for key, value in flatten(config):
    if key.startswith(SWEEP_GRID) and isinstance(value, (tuple, list)):
      target = key[len(SWEEP_GRID):]
      for v in value:  # every value the grid sets must pass the rules of the key it sets
        _check_leaf(target, v, rules, f"{key} value {v!r}")
      continue
    if key.startswith(TABLE_SHARED) and value is None:
      continue
    _check_leaf(key, value, rules, f"{key}={value!r}")
  if rules is TRAIN_RULES:
    check_resample(config)


RESAMPLE_MODES = ("fixed", "batch")


def check_resample(config: config_dict.ConfigDict | dict) -> str:
  """``poison.resample`` ('fixed' when absent), checked against the settings per-batch poisoning cannot serve.

  ``'fixed'``: one poisoned training set for the run; ``'batch'``: every training batch
  is poisoned on the fly (``train.online_poison``), in the badnets recipe only.

  Raises:
    ConfigError: an unknown value, or ``'batch'`` with clean-label poisoning, a count,
      PGD, ``apply_at_size``, streaming, another recipe or a sweep (ensemble).
  """
  poison = config.get("poison") if isinstance(config, (dict, config_dict.ConfigDict)) else None
  if not isinstance(poison, (dict, config_dict.ConfigDict)):
    return "fixed"
  value = poison.get("resample", "fixed")
  if not isinstance(value, str) or value not in RESAMPLE_MODES:
    raise ConfigError(f"poison.resample={value!r} is invalid; allowed: 'fixed' (one poisoned training set) or "
                      "'batch' (a fresh poisoned subset of every training batch)")
  if value == "fixed":
    return value
  data = config.get("data") or {}
  recipe = config.get("recipe", "badnets")
  conflicts = (
      (recipe != "badnets", f"recipe={recipe!r}", "recipe='badnets'"),
      ("sweep" in config, "a sweep (the ensemble recipe)", "a single badnets run"),
      (poison.get("mode") == "clean_label", "poison.mode='clean_label'", "poison.mode 'all_to_one' or 'all_to_all'"),
      (poison.get("count") is not None, f"poison.count={poison.get('count')!r}", "poison.rate (a fraction of every batch)"),
      (bool(poison.get("adv_eps", 0)), f"poison.adv_eps={poison.get('adv_eps')!r}", "poison.adv_eps=0"),
      (bool(poison.get("apply_at_size", 0)), f"poison.apply_at_size={poison.get('apply_at_size')!r}",
       "poison.apply_at_size=0"),
      (bool(data.get("stream", False)), "data.stream=True", "in-memory data (data.stream=False)"),
  )
  for bad, what, allowed in conflicts:
    if bad:
      raise ConfigError(f"poison.resample='batch' does not work with {what}; allowed with it: {allowed}")
  return value


def check_defense_config(config: config_dict.ConfigDict | dict) -> None:
  """:func:`check_config` with the defense rules (``configs/defenses.py``)."""
  check_config(config, DEFENSE_RULES)
