"""Backdoor triggers: images -> triggered images, built and validated on the host."""
from backdoor_jax.triggers.patch import COLORS
from backdoor_jax.triggers.patch import CONFIG_FIELDS
from backdoor_jax.triggers.patch import KIND_DEFAULTS
from backdoor_jax.triggers.patch import POSITIONS
from backdoor_jax.triggers.patch import TRIGGER_KINDS
from backdoor_jax.triggers.patch import Trigger
from backdoor_jax.triggers.patch import apply_trigger
from backdoor_jax.triggers.patch import make_patch_trigger
from backdoor_jax.triggers.patch import parse_color
from backdoor_jax.triggers.patch import parse_position
from backdoor_jax.triggers.patch import patch_side
from backdoor_jax.triggers.patch import stack_triggers
from backdoor_jax.triggers.patch import trigger_from_config

__all__ = [
    "COLORS",
    "CONFIG_FIELDS",
    "KIND_DEFAULTS",
    "POSITIONS",
    "TRIGGER_KINDS",
    "Trigger",
    "apply_trigger",
    "make_patch_trigger",
    "parse_color",
    "parse_position",
    "patch_side",
    "stack_triggers",
    "trigger_from_config",
]
