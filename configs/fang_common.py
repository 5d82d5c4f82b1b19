"""Compatibility name for the shared Fang & Choromanska construction, now in the library.

Import it directly instead: ``from backdoor_jax.configs.fang import fang_config``.
"""
from backdoor_jax.configs.fang import fang_config  # noqa: F401
