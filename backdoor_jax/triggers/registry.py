"""One entry point from a config to a trigger of any kind: :func:`trigger_from_config`."""
from __future__ import annotations

from typing import Any

import chex
import jax

from backdoor_jax.errors import ConfigError, check_choice
from backdoor_jax.triggers import blend, filters, moire, patch, ssba, warp
from backdoor_jax.triggers.base import cfg_get, cfg_keys

PATCH_KINDS = patch.TRIGGER_KINDS
TRIGGER_KINDS = PATCH_KINDS + ("blend", "wanet", "filter", "moire", "ssba")
BLEND_REGIONS = ("full", "patch")

# Every field :func:`trigger_from_config` understands; each kind reads its own and
# ignores the others, so one config section can hold the settings of every kind.
CONFIG_FIELDS = patch.CONFIG_FIELDS + (
    "seed",                                   # blend noise / wanet grid / moire: -1 = from the run seed
    "alpha", "blend_pattern", "blend_region",  # blend
    "wanet_k", "wanet_s", "wanet_grid_rescale", "wanet_cross_ratio",  # wanet
    "filter_name", "filter_strength",          # filter
    "moire_opacity", "moire_spacing", "moire_angles", "moire_perspective",  # moire (+ color)
    "ssba_path",                               # ssba: encoder .npz from launch/train_ssba.py
)


def trigger_key(cfg: Any, key: chex.PRNGKey | None) -> chex.PRNGKey:
  """The key a trigger's random pattern is drawn from.

  ``cfg.seed >= 0`` fixes the pattern independently of the run (``jax.random.key(seed)``);
  otherwise (``-1`` or unset) ``key`` is used, or ``jax.random.key(0)`` when it is None.
  """
  seed = cfg_get(cfg, "seed", -1)
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < -1:
    raise ConfigError(f"trigger seed {seed!r} is invalid; allowed: -1 (derive from the run seed) or an int >= 0")
  if seed >= 0:
    return jax.random.key(seed)
  return jax.random.key(0) if key is None else key


def trigger_from_config(cfg: Any, image_hw: tuple[int, int], key: chex.PRNGKey | None = None) -> Any:
  """Builds a trigger of any kind from a config (``ml_collections.ConfigDict``, dict, or object).

  Fields (all optional except ``kind``; missing, ``None`` or ``""`` -> the builder's
  default); any field not in :data:`CONFIG_FIELDS` is rejected to catch typos:

  * patch kinds (square, stripe, dots, custom): ``size``, ``position``, ``color``,
    ``margin``, ``pattern_path``, ``mask_path`` (see :mod:`~backdoor_jax.triggers.patch`);
  * ``blend``: ``alpha`` (0.2), ``blend_pattern`` (``'noise'`` or an image/.npy path),
    ``blend_region`` (``'full'``, or ``'patch'``: a square from size/position/margin);
  * ``wanet``: ``wanet_k`` (4), ``wanet_s`` (0.5), ``wanet_grid_rescale`` (1);
    ``wanet_cross_ratio`` is read by the poisoning code, not here;
  * ``filter``: ``filter_name`` (``'nashville'``), ``filter_strength`` (1);
  * ``moire``: ``moire_opacity`` (0.5), ``moire_spacing`` (2 px), ``moire_angles``
    ((0, 5) degrees), ``moire_perspective`` (0.15), ``color`` (white lines);
  * ``ssba``: ``ssba_path``, an encoder ``.npz`` written by ``launch/train_ssba.py``;
  * ``seed``: see :func:`trigger_key`.

  Args:
    cfg: the trigger config.
    image_hw: ``(H, W)`` of the images the trigger is applied to.
    key: PRNG key for random patterns (blend noise, WaNet grid, moire); see
      :func:`trigger_key`.
  Returns:
    A trigger (:class:`~backdoor_jax.triggers.Trigger`, ``BlendTrigger``,
    ``WarpTrigger``, ``FilterTrigger``, ``MoireTrigger`` or ``SSBATrigger``), usable with
    :func:`~backdoor_jax.triggers.apply_trigger`.
  Raises:
    ConfigError: for unknown fields or any invalid value.
  """
  unknown = [k for k in cfg_keys(cfg) if k not in CONFIG_FIELDS]
  if unknown:
    raise ConfigError(f"unknown trigger config field(s) {', '.join(map(repr, unknown))}; "
                      f"allowed: {', '.join(CONFIG_FIELDS)}")
  kind = cfg_get(cfg, "kind")
  if kind is None:
    raise ConfigError(f"trigger config has no kind; allowed: {', '.join(TRIGGER_KINDS)}")
  if isinstance(kind, str):
    kind = kind.strip().lower()
  check_choice("trigger kind", kind, TRIGGER_KINDS)
  hw = patch._check_image_hw(image_hw)  # pylint: disable=protected-access
  if kind in PATCH_KINDS:
    return patch.patch_from_config(cfg, hw)
  if kind == "ssba":
    path = cfg_get(cfg, "ssba_path")
    if path is None:
      raise ConfigError("trigger kind 'ssba' needs ssba_path; allowed: an encoder .npz written by "
                        "launch/train_ssba.py")
    return ssba.load_ssba_trigger(path, hw)
  if kind == "filter":
    return filters.make_filter_trigger(cfg_get(cfg, "filter_name", "nashville"),
                                       cfg_get(cfg, "filter_strength", 1.0))
  k = trigger_key(cfg, key)
  if kind == "blend":
    region = cfg_get(cfg, "blend_region", "full")
    check_choice("trigger blend_region", region, BLEND_REGIONS)
    mask = None
    if region == "patch":
      mask = patch.make_patch_trigger(hw, kind="square", size=cfg_get(cfg, "size", 0.1),
                                      position=cfg_get(cfg, "position"), margin=cfg_get(cfg, "margin", 0)).mask
    return blend.make_blend_trigger(hw, alpha=cfg_get(cfg, "alpha", 0.2), pattern=cfg_get(cfg, "blend_pattern", "noise"),
                                    key=k, mask=mask)
  if kind == "wanet":
    return warp.make_wanet_trigger(hw, k, k=cfg_get(cfg, "wanet_k", 4), s=cfg_get(cfg, "wanet_s", 0.5),
                                   grid_rescale=cfg_get(cfg, "wanet_grid_rescale", 1.0))
  return moire.make_moire_trigger(hw, k, opacity=cfg_get(cfg, "moire_opacity", 0.5),
                                  spacing=cfg_get(cfg, "moire_spacing", 2.0),
                                  angles=cfg_get(cfg, "moire_angles", (0.0, 5.0)),
                                  perspective=cfg_get(cfg, "moire_perspective", 0.15),
                                  color=cfg_get(cfg, "color", (255, 255, 255)))


def cross_ratio_from_config(cfg: Any) -> float:
  """WaNet's noise-mode ratio (cross samples per poisoned sample); 0 for the other kinds.

  Raises:
    ConfigError: for a negative or non-numeric ratio.
  """
  kind = cfg_get(cfg, "kind")
  if not (isinstance(kind, str) and kind.strip().lower() == "wanet"):
    return 0.0
  ratio = cfg_get(cfg, "wanet_cross_ratio", 2.0)
  return warp._check_real(ratio, "wanet_cross_ratio", minimum=0.0, strict=False)  # pylint: disable=protected-access
