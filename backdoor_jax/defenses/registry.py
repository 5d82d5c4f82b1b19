"""Defense names -> functions ``run(ctx, out_dir) -> report dict``."""
from __future__ import annotations

from typing import Any, Callable

from backdoor_jax.defenses import (activation_clustering, fine_pruning, neural_cleanse, spectral, strip,
                                   tv_denoise)

DEFENSES: dict[str, Callable[..., dict[str, Any]]] = {
    "neural_cleanse": neural_cleanse.run,
    "activation_clustering": activation_clustering.run,
    "spectral": spectral.run,
    "fine_pruning": fine_pruning.run,
    "strip": strip.run,
    "tv_denoise": tv_denoise.run,
}
NAMES: tuple[str, ...] = tuple(DEFENSES)
