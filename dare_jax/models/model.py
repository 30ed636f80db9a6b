"""The two-stage long-sequence CTR model (DIN, TWIN and every variant, DARE) in Flax Linen.

Batch (dict of int arrays): `iid, cid [B]`, `hist_iid, hist_cid [B, L]` (left-padded with 0,
[:, -1] most recent). Derived inside: time ids (target 0, history position j -> L - j) and the
mask (hist_iid > 0); optional overrides `tid [B]`, `hist_tid [B, L]`, `mask [B, L]`; optional
`example_mask [B]` (bool): the rows BatchNorm takes batch statistics over (evaluation with
`eval_batchnorm_uses_batch_stats` passes the valid rows of a padded batch; default all).

Outputs: `prob [B, 2]` (column 0 = click; softmax + 1e-8 as official), `logits [B, 2]`,
`aux_prob [B, 2]` (aux loss on), `attention_scores [B, L]` (first-stage scores over the whole
history, masked positions -2**32 + 1), `representation [B, F]` (the main-MLP input),
`topk_indices [B, k]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dare_jax.models import search
from dare_jax.models.embeddings import EmbeddingTables, Projections, gather_roles
from dare_jax.models.layers import MLPHead
from dare_jax.models.variants import VariantSpec, resolve_variant

MAIN_HEAD_HIDDEN = (200, 80)
AUX_HEAD_HIDDEN = (200,)
PROBABILITY_EPS = 1e-8  # official: softmax(logits) + 1e-8


def history_time_ids(length: int) -> jax.Array:
    """`[L]` time ids: position j -> L - j, so the most recent behaviour has 1."""
    return length - jnp.arange(length, dtype=jnp.int32)


def read_batch(batch: dict[str, jax.Array], batched_time: bool) -> dict[str, jax.Array]:
    """The model inputs of `batch` (see the module docstring) as int32 / bool arrays.

    Keys iid, cid `[B]`; hist_iid, hist_cid `[B, L]`; tid, hist_tid: the batch's overrides,
    else the derived ids (target 0, history `history_time_ids`), unbatched `[]` / `[L]` (the
    same for every example) or, with `batched_time`, broadcast to `[B]` / `[B, L]`; valid
    `[B, L]`: the batch's `mask`, else hist_iid > 0; example_mask `[B]` or None.
    """
    ids = {k: jnp.asarray(batch[k], jnp.int32) for k in ("iid", "cid", "hist_iid", "hist_cid")}
    batch_size, length = ids["hist_iid"].shape
    tid, hist_tid = jnp.zeros((), jnp.int32), history_time_ids(length)
    if batched_time:
        tid, hist_tid = (
            jnp.zeros((batch_size,), jnp.int32),
            jnp.broadcast_to(hist_tid, (batch_size, length)),
        )
    ids["tid"] = jnp.asarray(batch["tid"], jnp.int32) if "tid" in batch else tid
    ids["hist_tid"] = jnp.asarray(batch["hist_tid"], jnp.int32) if "hist_tid" in batch else hist_tid
    mask = batch.get("mask")
    ids["valid"] = ids["hist_iid"] > 0 if mask is None else jnp.asarray(mask).astype(bool)
    example_mask = batch.get("example_mask")
    ids["example_mask"] = None if example_mask is None else jnp.asarray(example_mask, bool)
    return ids


class TwoStageModel(nn.Module):
    """Search (top-k or SIM hard) over the history, aggregate, predict with an MLP.

    Attributes: cfg (a validated model config), spec (its VariantSpec), item_n, cate_n,
    max_length.
    """

    cfg: ml_collections.FrozenConfigDict
    spec: VariantSpec
    item_n: int
    cate_n: int
    max_length: int

    def _fields(self) -> tuple[str, ...]:
        return ("item", "category", "time") if self.cfg.use_time else ("item", "category")

    def _score_split(self) -> int | None:
        """Width of the separately scaled last part of the attention vector (None: no split).

        Concat mode splits off the time part. Without time, the official code still splits
        at the last attention_time_embedding_dim entries (with dims 16 the item and category
        parts are then scaled separately); we do the same so weights stay interchangeable.
        """
        cfg, spec = self.cfg, self.spec
        if cfg.time_mode == "add":
            return None
        proj = spec.projection
        if cfg.use_time and proj is not None and proj.per_field and proj.output_dim:
            return proj.output_dim  # projection_large_emb_small_output: time part is 16 wide
        return spec.table_dims[spec.tables["attention_target"]]["time"]

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
        cfg, spec = self.cfg, self.spec
        # Derived time ids are the same for every example: keep them unbatched (target: 0,
        # history: [L]) so their lookups are gathered once (see gather_roles).
        inputs = read_batch(batch, batched_time=False)
        iid, cid, hist_iid, hist_cid, tid, hist_tid, valid = (
            inputs[k] for k in ("iid", "cid", "hist_iid", "hist_cid", "tid", "hist_tid", "valid")
        )
        batch_size = hist_iid.shape[0]

        # Embedding tables (time tables exist even without time when official_parameters_always).
        with_time_tables = cfg.use_time or cfg.official_parameters_always
        rows = (("item", self.item_n), ("category", self.cate_n))
        if with_time_tables:
            rows += (("time", int(cfg.time_table_size)),)
        tables = EmbeddingTables(spec, rows, cfg.init_std, name="embed")()
        fields = self._fields()
        target_ids = {"item": iid, "category": cid, "time": tid}
        history_ids = {"item": hist_iid, "category": hist_cid, "time": hist_tid}
        role_fields = gather_roles(
            spec,
            tables,
            target_ids,
            history_ids,
            fields,
            (batch_size,),
            row_grads=self if cfg.get("row_sparse_embedding_grads", False) else None,
        )
        unused_time = {}
        if not cfg.use_time and cfg.official_parameters_always:
            unused_time = {r: spec.table_dims[spec.tables[r]]["time"] for r in role_fields}
        vectors = Projections(
            spec, bool(cfg.use_time), str(cfg.time_mode), cfg.init_std, unused_time, name="project"
        )(role_fields)
        # Behaviour vectors may be parts (search.Behaviours); target vectors are small `[B, D]`.
        query = jnp.concatenate(search.as_parts(vectors["attention_target"]), axis=-1)
        target_repr = jnp.concatenate(search.as_parts(vectors["representation_target"]), axis=-1)
        keys, behavior_repr = vectors["attention_behavior"], vectors["representation_behavior"]

        # First stage: scores over the whole history.
        if spec.score == "din_mlp":
            scores = search.DinAttentionScores(cfg.init_std, name="din_attention")(query, keys)
        else:
            scores = search.dot_product_scores(query, keys, self._score_split())
        k = int(cfg.top_k)
        if cfg.soft_search:
            kept = valid
            masked = search.mask_scores(scores, valid)
            indices = search.soft_search_indices(masked, k)
        else:
            same_category = hist_cid == cid[:, None]
            indices, kept = search.hard_search_indices(valid, same_category, k)
            masked = search.mask_scores(scores, kept)
        # Second stage: softmax over the k kept, weighted sum of representation vectors.
        retrieved = search.aggregate_selected(masked, behavior_repr, indices)
        # Aux head aggregate: softmax over ALL kept behaviours (soft: every valid one; hard: the
        # k selected, as the official hard path masks everything to the selection).
        full_aggregate = search.full_attention(masked, behavior_repr)

        average = None
        if cfg.use_long_seq_average:
            weights = kept.astype(target_repr.dtype)
            average = search.weighted_sum(weights, behavior_repr) / (
                jnp.sum(weights, axis=1, keepdims=True) + 1.0
            )
        representation = main_features(cfg, target_repr, retrieved, average)

        outputs = {
            "attention_scores": masked,
            "representation": representation,
            "topk_indices": indices,
        }
        outputs.update(
            predict(
                cfg,
                representation,
                target_repr,
                full_aggregate,
                train,
                self.is_initializing(),
                inputs["example_mask"],
            )
        )
        return outputs


def main_features(
    cfg: ml_collections.ConfigDict,
    target_repr: jax.Array,
    retrieved: jax.Array,
    average: jax.Array | None,
) -> jax.Array:
    """The main-MLP input `[B, F]` in SPEC order: target representation, the retrieved
    aggregate, the history average (when used); then, with the cross feature (TR), the
    target times the aggregate (and times the average). `only_odot` keeps the products only.
    All inputs `[B, D_repr]`; `average` is None without `use_long_seq_average`."""
    features = [] if cfg.only_odot else [target_repr, retrieved]
    if average is not None and not cfg.only_odot:
        features.append(average)
    if cfg.use_cross_feature:
        features.append(target_repr * retrieved)
        if average is not None:
            features.append(target_repr * average)
    return jnp.concatenate(features, axis=-1)


def predict(
    cfg: ml_collections.ConfigDict,
    representation: jax.Array,
    target_repr: jax.Array,
    full_aggregate: jax.Array | None,
    train: bool,
    initializing: bool,
    example_mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The heads, called from inside a model's compact `__call__` (they become its `head/...`
    submodule; `initializing` is the caller's `self.is_initializing()`): `logits`, `prob`
    `[B, 2]` and, with the aux loss, `aux_logits`, `aux_prob`. `example_mask` `[B]`: the
    rows their BatchNorm takes batch statistics over (None: all).

    The aux head reads `[target repr, full-attention aggregate, their product]` (without TR:
    the first two; `only_odot`: the product). Its parameters also exist when the aux loss is
    off and `official_parameters_always` (as the official constructor builds them);
    `full_aggregate` None means the model has no full attention (no aux head at all).
    """
    heads = _Heads(
        MAIN_HEAD_HIDDEN,
        AUX_HEAD_HIDDEN,
        init_std=cfg.init_std,
        use_batch_stats_at_eval=bool(cfg.eval_batchnorm_uses_batch_stats),
        name="head",
    )
    aux_input = None
    wants_aux = cfg.use_aux_loss or (initializing and cfg.official_parameters_always)
    if full_aggregate is not None and wants_aux:
        if cfg.only_odot:
            aux_input = target_repr * full_aggregate
        elif cfg.use_cross_feature:
            aux_input = jnp.concatenate(
                [target_repr, full_aggregate, target_repr * full_aggregate], axis=-1
            )
        else:
            aux_input = jnp.concatenate([target_repr, full_aggregate], axis=-1)
    main_logits, aux_logits = heads(representation, aux_input, train, example_mask)
    outputs = {"logits": main_logits}
    if cfg.use_aux_loss and aux_logits is not None:
        outputs["aux_logits"] = aux_logits
        outputs["aux_prob"] = jax.nn.softmax(aux_logits, axis=-1) + PROBABILITY_EPS
    outputs["prob"] = jax.nn.softmax(main_logits, axis=-1) + PROBABILITY_EPS
    return outputs


class _Heads(nn.Module):
    """Main head (`head/main/...`) and auxiliary head (`head/aux/...`)."""

    main_hidden: tuple[int, ...]
    aux_hidden: tuple[int, ...]
    init_std: float = 0.01
    use_batch_stats_at_eval: bool = False

    @nn.compact
    def __call__(
        self,
        main_input: jax.Array,
        aux_input: jax.Array | None,
        train: bool,
        example_mask: jax.Array | None = None,
    ):
        main = MLPHead(self.main_hidden, self.init_std, self.use_batch_stats_at_eval, name="main")(
            main_input, train, example_mask
        )
        aux = None
        if aux_input is not None:
            aux = MLPHead(self.aux_hidden, self.init_std, self.use_batch_stats_at_eval, name="aux")(
                aux_input, train, example_mask
            )
        return main, aux


def build_two_stage_model(
    cfg: ml_collections.ConfigDict, item_n: int, cate_n: int, max_length: int
) -> TwoStageModel:
    """A TwoStageModel for a validated config (see dare_jax.models.build_model)."""
    spec = resolve_variant(cfg)
    return TwoStageModel(
        ml_collections.FrozenConfigDict(cfg), spec, int(item_n), int(cate_n), int(max_length)
    )
