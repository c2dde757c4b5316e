"""grass_jax: GRASS (gradient-based adaptive layer-wise importance sampling) in JAX.

The optax-style API::

  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      grass_jax.transform(optax.adamw(1e-5), layers=grass_jax.stacked_layers(),
                          num_active=2, period=20))
"""

from grass_jax.importance import layer_grad_norms, update_importance
from grass_jax.layers import (NOT_A_LAYER, STACKED, LayerLayout, build_layout, indexed_layers,
                              stacked_layers)
from grass_jax.pretrained import load_pretrained, save_pretrained
from grass_jax.sampling import draw, probabilities
from grass_jax.transform import (STRATEGIES, GrassSettings, GrassState, apply_slot_updates, diagnostics, find_state,
                                 fixed, full, gather_active, lisa, replace_state, strategy, strategy_settings,
                                 transform)
from grass_jax.xla_flags import use_deterministic_flags, use_recommended_flags

__version__ = "0.1.0"

__all__ = [
    "NOT_A_LAYER", "STACKED", "STRATEGIES", "GrassSettings", "GrassState", "LayerLayout", "apply_slot_updates",
    "build_layout", "diagnostics", "draw", "find_state", "fixed", "full", "gather_active", "indexed_layers",
    "layer_grad_norms", "lisa", "load_pretrained", "probabilities", "save_pretrained", "replace_state", "stacked_layers", "strategy",
    "strategy_settings", "transform", "update_importance", "use_deterministic_flags", "use_recommended_flags",
]
