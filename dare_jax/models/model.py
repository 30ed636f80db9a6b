"""The two-stage long-sequence CTR model of every variant (DIN, TWIN, DARE, ETA, SDIM, TWIN-V2...).

Batch (dict of int arrays): `iid, cid [B]`, `hist_iid, hist_cid [B, L]` (left-padded with 0,
[:, -1] most recent). Derived inside: time ids (target 0, history position j -> L - j) and the
mask (hist_iid > 0); optional overrides `tid [B]`, `hist_tid [B, L]`, `mask [B, L]`; optional
`example_mask [B]` (bool): the rows BatchNorm takes batch statistics over (evaluation with
`eval_batchnorm_uses_batch_stats` passes the valid rows of a padded batch; default all).

First stage: the variant's search (`VariantSpec.search`, a key of SEARCHES), written for one
example and `jax.vmap`-ed over the batch. Options of every search that scores the history:
`search_chunk` (chunked, linear memory) and `score_dtype`.

Outputs: `prob [B, 2]` (column 0 = click; softmax + 1e-8 as official), `logits [B, 2]`,
`aux_prob [B, 2]` (aux loss on), `representation [B, F]` (the main-MLP input) and, per search:
`attention_scores [B, L]` (scores over the whole history, masked positions -2**32 + 1; ETA only
with the aux loss), `topk_indices [B, k]`; ETA `hamming_distance [B, L]`; SDIM
`bucket_sizes [B, G]`; TWIN-V2 `cluster_ids [B, L]`, `cluster_sizes [B, S]` (its
`attention_scores` / `topk_indices` are over the S clusters, the ln-size bias included).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dare_jax.models import eta, sdim, search, twin_v2
from dare_jax.models.embeddings import (
    EmbeddingTables,
    Lookup,
    Projections,
    lookup_roles,
    lookups,
    row_perturbations,
)
from dare_jax.models.layers import MLPHead
from dare_jax.models.spec import ModelSpec
from dare_jax.models.variants import ROLES, VariantSpec

MAIN_HEAD_HIDDEN = (200, 80)
AUX_HEAD_HIDDEN = (200,)
PROBABILITY_EPS = 1e-8  # official: softmax(logits) + 1e-8
TARGET_ROLES = tuple(role for role in ROLES if role.endswith("target"))

# The first stages: (query [D], target {'category': []}, History, cfg, want_full) -> Retrieval.
SEARCHES = {
    "soft": search.soft_search,
    "hard": search.hard_search,
    "eta": eta.search,
    "sdim": sdim.search,
    "twin_v2": twin_v2.search,
}


def history_time_ids(length: int) -> jax.Array:
    """`[L]` time ids: position j -> L - j, so the most recent behaviour has 1."""
    return length - jnp.arange(length, dtype=jnp.int32)


def read_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The model inputs of `batch` (see the module docstring) as int32 / bool arrays.

    Keys iid, cid `[B]`; hist_iid, hist_cid `[B, L]`; tid, hist_tid: the batch's overrides
    (`[B]`, `[B, L]`), else the derived ids, the same for every example: `[]` and `[L]`
    (`history_time_ids`); valid `[B, L]`: the batch's `mask`, else hist_iid > 0;
    example_mask `[B]` or None.
    """
    ids = {k: jnp.asarray(batch[k], jnp.int32) for k in ("iid", "cid", "hist_iid", "hist_cid")}
    length = ids["hist_iid"].shape[1]
    ids["tid"] = jnp.asarray(batch.get("tid", 0), jnp.int32)
    hist_tid = batch["hist_tid"] if "hist_tid" in batch else history_time_ids(length)
    ids["hist_tid"] = jnp.asarray(hist_tid, jnp.int32)
    mask = batch.get("mask")
    ids["valid"] = ids["hist_iid"] > 0 if mask is None else jnp.asarray(mask).astype(bool)
    example_mask = batch.get("example_mask")
    ids["example_mask"] = None if example_mask is None else jnp.asarray(example_mask, bool)
    return ids


class TwoStageModel(nn.Module):
    """Search over the history (the variant's strategy), aggregate, predict with an MLP.

    Attributes: cfg (the model's options), item_n and cate_n (the item and category table
    rows), max_length (the history length L).
    """

    cfg: ModelSpec
    item_n: int
    cate_n: int
    max_length: int

    @property
    def spec(self) -> VariantSpec:
        return self.cfg.variant

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields a behaviour vector concatenates."""
        return ("item", "category", "time") if self.cfg.use_time else ("item", "category")

    @property
    def lookups(self) -> tuple[Lookup, ...]:
        """Every gather of a training step (`dare_jax.optim` reads their gradient rows)."""
        return lookups(self.spec, self.fields)

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
        inputs = read_batch(batch)
        batch_size = inputs["hist_iid"].shape[0]

        # Embedding tables (time tables exist even without time when official_parameters_always).
        rows = (("item", self.item_n), ("category", self.cate_n))
        if cfg.use_time or cfg.official_parameters_always:
            rows += (("time", int(cfg.time_table_size)),)
        tables = EmbeddingTables(spec, rows, cfg.init_std, name="embed")()
        fields = self.fields
        unused_time = {}
        if not cfg.use_time and cfg.official_parameters_always:
            unused_time = {r: spec.table_dims[spec.tables[r]]["time"] for r in ROLES}
        project = Projections(
            spec, bool(cfg.use_time), str(cfg.time_mode), cfg.init_std, unused_time, name="project"
        )

        def perturbations(ids: dict[str, jax.Array], is_target: bool) -> dict[str, jax.Array]:
            return row_perturbations(self, spec, tables, ids, fields, is_target)

        # Targets: `[B, D]` vectors (the derived time id is looked up once and broadcast).
        target_ids = {"item": inputs["iid"], "category": inputs["cid"], "time": inputs["tid"]}
        target_rows = lookup_roles(
            spec, tables, target_ids, fields, TARGET_ROLES, perturbations(target_ids, True)
        )
        target_rows = jax.tree.map(
            lambda r: jnp.broadcast_to(r, (batch_size, r.shape[-1])), target_rows
        )
        targets = {
            role: jnp.concatenate(search.as_parts(vector), axis=-1)
            for role, vector in project(target_rows).items()
        }

        # History: per-position ids (derived time ids `[L]`, the same for every example, stay
        # unbatched under vmap) and row perturbations, looked up by the search as it goes.
        history_ids = {
            "item": inputs["hist_iid"],
            "category": inputs["hist_cid"],
            "time": inputs["hist_tid"],
        }
        positions = {**history_ids, "valid": inputs["valid"], **perturbations(history_ids, False)}
        # Derived time ids `[L]` (and their rows' perturbation) are the same for every example.
        unbatched = {"time"} | {x.name for x in self.lookups if x.table.field == "time"}
        shared_time = inputs["hist_tid"].ndim == 1
        in_axes = {key: None if shared_time and key in unbatched else 0 for key in positions}

        def vectors(at: dict[str, jax.Array], role: str) -> search.Behaviours:
            return project(lookup_roles(spec, tables, at, fields, (role,), at))[role]

        if spec.score == "din_mlp":
            score = search.DinAttentionScores(
                cfg.init_std, dtype=str(cfg.score_dtype), name="din_attention"
            )
        else:
            split, dtype = self._score_split(), str(cfg.score_dtype)

            def score(query: jax.Array, keys: search.Behaviours) -> jax.Array:
                return search.dot_product_scores(query, keys, split, dtype)

        # Chunks only change memory; init runs unchunked so that every parameter is created
        # outside the chunk loop.
        chunk = 0 if self.is_initializing() else int(cfg.search_chunk)
        want_full = cfg.use_aux_loss or (self.is_initializing() and cfg.official_parameters_always)

        def one_example(query, target_category, positions):
            history = search.History(positions, vectors, score, chunk)
            found = SEARCHES[spec.search](
                query, {"category": target_category}, history, cfg, want_full
            )
            average = None
            if cfg.use_long_seq_average:
                weights = found.counted.astype(found.retrieved.dtype)
                average = history.weighted_sum(weights) / (jnp.sum(weights) + 1.0)
            return found.retrieved, found.full, average, found.outputs

        retrieved, full_aggregate, average, outputs = jax.vmap(
            one_example, in_axes=(0, 0, in_axes)
        )(targets["attention_target"], inputs["cid"], positions)

        target_repr = targets["representation_target"]
        representation = main_features(cfg, target_repr, retrieved, average)
        outputs = dict(outputs, representation=representation)
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
    cfg: ModelSpec,
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
    cfg: ModelSpec,
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
