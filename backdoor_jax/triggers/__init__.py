"""Backdoor triggers: images -> triggered images, built and validated on the host.

Every kind is a frozen ``chex.dataclass`` (a pytree) applied by the one pure function
:func:`apply_trigger` (or ``trigger.apply(images)``): patches (square, stripe, dots,
custom, checkerboard, noise_patch), ``blend``, ``wanet`` (warp), ``filter`` (nashville),
``moire`` and ``ssba`` (a trained steganographic encoder). Build any of them from a config
with :func:`trigger_from_config`; each kind registers its name, config section and builder
with :func:`register_trigger` (see :mod:`backdoor_jax.triggers.registry` for the config
shape and ``docs/extending.md`` for adding a kind).
"""
import importlib as _importlib
import pkgutil as _pkgutil

from backdoor_jax.triggers import patch as _patch  # noqa: F401  (registers the patch kinds first)
from backdoor_jax.triggers.base import TriggerBase
from backdoor_jax.triggers.base import apply_trigger
from backdoor_jax.triggers.base import is_trigger
from backdoor_jax.triggers.base import trigger_region
from backdoor_jax.triggers.blend import BlendTrigger
from backdoor_jax.triggers.blend import make_blend_trigger
from backdoor_jax.triggers.filters import FILTER_NAMES
from backdoor_jax.triggers.filters import FilterTrigger
from backdoor_jax.triggers.filters import make_filter_trigger
from backdoor_jax.triggers.filters import nashville
from backdoor_jax.triggers.moire import MoireTrigger
from backdoor_jax.triggers.moire import make_moire_trigger
from backdoor_jax.triggers.patch import COLORS
from backdoor_jax.triggers.patch import KIND_DEFAULTS
from backdoor_jax.triggers.patch import POSITIONS
from backdoor_jax.triggers.patch import Trigger
from backdoor_jax.triggers.patch import make_patch_trigger
from backdoor_jax.triggers.patch import parse_color
from backdoor_jax.triggers.patch import parse_position
from backdoor_jax.triggers.patch import patch_side
from backdoor_jax.triggers.patch import stack_triggers
from backdoor_jax.triggers.patterns import make_checkerboard_trigger
from backdoor_jax.triggers.patterns import make_noise_patch_trigger
from backdoor_jax.triggers.registry import COMMON_FIELDS
from backdoor_jax.triggers.registry import TriggerArgs
from backdoor_jax.triggers.registry import cross_ratio_from_config
from backdoor_jax.triggers.registry import default_config
from backdoor_jax.triggers.registry import ensure_section
from backdoor_jax.triggers.registry import register_trigger
from backdoor_jax.triggers.registry import trigger_from_config
from backdoor_jax.triggers.registry import trigger_kinds
from backdoor_jax.triggers.registry import unregister_trigger
from backdoor_jax.triggers.registry import upgrade_flat_config
from backdoor_jax.triggers.ssba import SSBATrigger
from backdoor_jax.triggers.warp import WarpTrigger
from backdoor_jax.triggers.warp import apply_noise_warp
from backdoor_jax.triggers.warp import make_wanet_trigger

# Every module of this package is imported, so a new kind is one file that registers itself.
for _module in _pkgutil.iter_modules(__path__):
  _importlib.import_module(f"{__name__}.{_module.name}")

PATCH_KINDS = ("square", "stripe", "dots", "custom", "checkerboard", "noise_patch")  # kinds with a region
TRIGGER_KINDS = trigger_kinds()  # the built-in kinds; trigger_kinds() also lists kinds registered later

__all__ = [
    "BlendTrigger",
    "COLORS",
    "COMMON_FIELDS",
    "FILTER_NAMES",
    "FilterTrigger",
    "KIND_DEFAULTS",
    "MoireTrigger",
    "PATCH_KINDS",
    "POSITIONS",
    "SSBATrigger",
    "TRIGGER_KINDS",
    "Trigger",
    "TriggerArgs",
    "TriggerBase",
    "WarpTrigger",
    "apply_noise_warp",
    "apply_trigger",
    "cross_ratio_from_config",
    "default_config",
    "ensure_section",
    "is_trigger",
    "make_blend_trigger",
    "make_checkerboard_trigger",
    "make_filter_trigger",
    "make_moire_trigger",
    "make_noise_patch_trigger",
    "make_patch_trigger",
    "make_wanet_trigger",
    "nashville",
    "parse_color",
    "parse_position",
    "patch_side",
    "register_trigger",
    "stack_triggers",
    "trigger_from_config",
    "trigger_kinds",
    "trigger_region",
    "unregister_trigger",
    "upgrade_flat_config",
]
