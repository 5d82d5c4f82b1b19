"""Backdoor triggers: images -> triggered images, built and validated on the host.

Every kind is a frozen ``chex.dataclass`` (a pytree) applied by the one pure function
:func:`apply_trigger` (or ``trigger.apply(images)``): patches (square, stripe, dots,
custom), ``blend``, ``wanet`` (warp), ``filter`` (nashville), ``moire`` and ``ssba``
(a trained steganographic encoder). Build any of them from a config with
:func:`trigger_from_config`.
"""
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
from backdoor_jax.triggers.registry import CONFIG_FIELDS
from backdoor_jax.triggers.registry import PATCH_KINDS
from backdoor_jax.triggers.registry import TRIGGER_KINDS
from backdoor_jax.triggers.registry import cross_ratio_from_config
from backdoor_jax.triggers.registry import trigger_from_config
from backdoor_jax.triggers.ssba import SSBATrigger
from backdoor_jax.triggers.warp import WarpTrigger
from backdoor_jax.triggers.warp import apply_noise_warp
from backdoor_jax.triggers.warp import make_wanet_trigger

__all__ = [
    "BlendTrigger",
    "COLORS",
    "CONFIG_FIELDS",
    "FILTER_NAMES",
    "FilterTrigger",
    "KIND_DEFAULTS",
    "MoireTrigger",
    "PATCH_KINDS",
    "POSITIONS",
    "SSBATrigger",
    "TRIGGER_KINDS",
    "Trigger",
    "TriggerBase",
    "WarpTrigger",
    "apply_noise_warp",
    "apply_trigger",
    "cross_ratio_from_config",
    "is_trigger",
    "make_blend_trigger",
    "make_filter_trigger",
    "make_moire_trigger",
    "make_patch_trigger",
    "make_wanet_trigger",
    "nashville",
    "parse_color",
    "parse_position",
    "patch_side",
    "stack_triggers",
    "trigger_from_config",
    "trigger_region",
]
