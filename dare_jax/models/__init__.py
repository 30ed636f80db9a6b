"""The model zoo: DIN, TWIN and every variant, DARE, ETA, SDIM, TWIN-V2 (Flax Linen, pure).

One model (`TwoStageModel`) whose variants are data (`VariantSpec`): which tables, which
projections, which score and which search.

model = build_model(model_cfg, item_n, cate_n, max_length)
variables = model.init(rng, batch, train=False)        # {'params', 'batch_stats'}
outputs, updates = model.apply(variables, batch, train=True, mutable=['batch_stats'])
outputs = model.apply(variables, batch, train=False)
"""

from __future__ import annotations

import ml_collections

from dare_jax.models.config import (
    canonical_name,
    default_model_config,
    validate_model_config,
)
from dare_jax.models.gradient_paths import combine_path_gradients
from dare_jax.models.loss import l2_penalty, loss_terms
from dare_jax.models.model import TwoStageModel
from dare_jax.models.variants import VariantSpec, resolve_variant


def build_model(
    model_cfg: ml_collections.ConfigDict, item_n: int, cate_n: int, max_length: int
) -> TwoStageModel:
    """Validate `model_cfg` (ValueError naming the field) and build the Flax module."""
    validate_model_config(model_cfg, item_n, cate_n, max_length)
    return TwoStageModel(
        ml_collections.FrozenConfigDict(model_cfg),
        resolve_variant(model_cfg),
        int(item_n),
        int(cate_n),
        int(max_length),
    )


__all__ = [
    "TwoStageModel",
    "VariantSpec",
    "build_model",
    "canonical_name",
    "combine_path_gradients",
    "default_model_config",
    "l2_penalty",
    "loss_terms",
    "resolve_variant",
    "validate_model_config",
]
