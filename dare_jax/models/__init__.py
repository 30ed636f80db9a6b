"""The model zoo: DIN, TWIN and every variant, DARE, ETA, SDIM, TWIN-V2 (Flax Linen, pure).

One model (`TwoStageModel`) whose variants are data (`VariantSpec`, derived from the options
of a `ModelSpec`): which tables, which projections, which score and which search.

    model = TwoStageModel(ModelSpec(name="twin"), item_n, cate_n, max_length)
    variables = model.init(rng, batch, train=False)        # {'params', 'batch_stats'}
    outputs, updates = model.apply(variables, batch, train=True, mutable=['batch_stats'])
    outputs = model.apply(variables, batch, train=False)
"""

from dare_jax.models.embeddings import Lookup, TableKey
from dare_jax.models.loss import l2_penalty, loss_terms
from dare_jax.models.model import TwoStageModel
from dare_jax.models.spec import ModelSpec
from dare_jax.models.variants import VariantSpec, canonical_name

__all__ = [
    "Lookup",
    "ModelSpec",
    "TableKey",
    "TwoStageModel",
    "VariantSpec",
    "canonical_name",
    "l2_penalty",
    "loss_terms",
]
