"""The two-stage long-sequence CTR model of every variant (DIN, TWIN, DARE, ETA, SDIM, TWIN-V2...).

Batch (dict of int arrays): `iid, cid [B]`, `hist_iid, hist_cid [B, L]` (left-padded with 0,
[:, -1] most recent). Derived inside: time ids (target 0, history position j -> L - j) and the
mask (hist_iid > 0); optional overrides `tid [B]`, `hist_tid [B, L]`, `mask [B, L]`; optional
`example_mask [B]` (bool): the rows BatchNorm takes batch statistics over (evaluation with
`eval_batchnorm_uses_batch_stats` passes the valid rows of a padded batch; default all).
First stage: the variant's search (a key of SEARCHES), for one example, vmapped.

Outputs: `prob [B, 2]` (column 0 = click; softmax + 1e-8 as official), `logits [B, 2]`,
`aux_prob [B, 2]` (aux loss on), `representation [B, F]` (the main-MLP input) and, per search:
`attention_scores [B, L]` (scores over the whole history, masked positions -2**32 + 1; ETA only
with the aux loss), `topk_indices [B, k]`; ETA `hamming_distance [B, L]`; SDIM
`bucket_sizes [B, G]`; TWIN-V2 `cluster_ids [B, L]`, `cluster_sizes [B, S]` (its
`attention_scores` / `topk_indices` are over the S clusters, the ln-size bias included).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dare_jax.models import embeddings, eta, sdim, search, twin_v2
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


def read_batch(batch: dict[str, jax.Array]):
    """int32 / bool (target ids `[B]`, history ids `[B, L]`, each {item, category, time};
    valid `[B, L]`; example_mask `[B]` or None); derived time ids are `[]` and `[L]`."""
    length = jnp.shape(batch["hist_iid"])[1]
    target = {"item": batch["iid"], "category": batch["cid"], "time": batch.get("tid", 0)}
    history_time = batch["hist_tid"] if "hist_tid" in batch else length - jnp.arange(length)
    history = {"item": batch["hist_iid"], "category": batch["hist_cid"], "time": history_time}
    target, history = (
        {k: jnp.asarray(v, jnp.int32) for k, v in x.items()} for x in (target, history)
    )
    mask, example_mask = batch.get("mask"), batch.get("example_mask")
    valid = history["item"] > 0 if mask is None else jnp.asarray(mask).astype(bool)
    return target, history, valid, None if example_mask is None else jnp.asarray(example_mask, bool)


class TwoStageModel(nn.Module):
    """Search over the history (the variant's strategy), aggregate, predict with an MLP.
    item_n, cate_n: table rows; max_length: the history length L."""

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
    def lookups(self) -> tuple[embeddings.Lookup, ...]:
        """Every gather of a training step (`dare_jax.optim` reads their gradient rows)."""
        return embeddings.lookups(self.spec, self.fields)

    def _score_split(self) -> int | None:
        """Width of the separately scaled last part of the attention vector (None: no split):
        the time part or, without time (as officially), the last attention time-dim entries."""
        cfg, spec = self.cfg, self.spec
        if cfg.time_mode == "add":
            return None
        proj = spec.projection
        if cfg.use_time and proj is not None and proj.per_field and proj.output_dim:
            return proj.output_dim  # projection_large_emb_small_output: time part is 16 wide
        return spec.table_dims[spec.tables["attention_target"]]["time"]

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
        cfg, spec, fields = self.cfg, self.spec, self.fields
        target_ids, history_ids, valid, example_mask = read_batch(batch)

        # Time tables exist even without time when official_parameters_always.
        sizes = (("item", self.item_n), ("category", self.cate_n))
        if cfg.use_time or cfg.official_parameters_always:
            sizes += (("time", int(cfg.time_table_size)),)
        tables = embeddings.EmbeddingTables(spec, sizes, cfg.init_std, name="embed")()
        unused_time = {}
        if not cfg.use_time and cfg.official_parameters_always:
            unused_time = {r: spec.table_dims[spec.tables[r]]["time"] for r in ROLES}
        project = embeddings.Projections(
            spec, bool(cfg.use_time), str(cfg.time_mode), cfg.init_std, unused_time, name="project"
        )

        # Targets: `[B, D]` vectors (the derived time id is looked up once and broadcast).
        changes = embeddings.row_perturbations(self, spec, tables, target_ids, fields, True)
        rows = embeddings.lookup_roles(spec, tables, target_ids, fields, TARGET_ROLES, changes)
        rows = jax.tree.map(lambda r: jnp.broadcast_to(r, (valid.shape[0], r.shape[-1])), rows)
        targets = {
            role: jnp.concatenate(search.as_parts(vector), axis=-1)
            for role, vector in project(rows).items()
        }

        # History: per-position ids and row perturbations, looked up by the search as it goes.
        changes = embeddings.row_perturbations(self, spec, tables, history_ids, fields, False)
        positions = {**history_ids, "valid": valid, **changes}
        # Derived time ids `[L]` (and their rows' perturbation) are the same for every example.
        unbatched = {"time"} | {x.name for x in self.lookups if x.table.field == "time"}
        shared_time = history_ids["time"].ndim == 1
        in_axes = {key: None if shared_time and key in unbatched else 0 for key in positions}

        def vectors(at: dict[str, jax.Array], role: str) -> search.Behaviours:
            return project(embeddings.lookup_roles(spec, tables, at, fields, (role,), at))[role]

        dtype = str(cfg.score_dtype)
        if spec.score == "din_mlp":
            score = search.DinAttentionScores(cfg.init_std, dtype=dtype, name="din_attention")
        else:
            split = self._score_split()
            score = functools.partial(search.dot_product_scores, split=split, dtype=dtype)

        # Init runs unchunked, so that every parameter is created outside the chunk loop.
        chunk = 0 if self.is_initializing() else int(cfg.search_chunk)
        want_full = cfg.use_aux_loss or (self.is_initializing() and cfg.official_parameters_always)

        def one_example(query, category, positions):
            history = search.History(positions, vectors, score, chunk)
            found = SEARCHES[spec.search](query, {"category": category}, history, cfg, want_full)
            average = None
            if cfg.use_long_seq_average:
                weights = found.counted.astype(found.retrieved.dtype)
                average = history.weighted_sum(weights) / (jnp.sum(weights) + 1.0)
            return found.retrieved, found.full, average, found.outputs

        retrieved, full, average, outputs = jax.vmap(one_example, in_axes=(0, 0, in_axes))(
            targets["attention_target"], target_ids["category"], positions
        )

        # The aux head reads the full-attention aggregate as main_features the retrieved one; it
        # also exists with official_parameters_always (as the official constructor builds it).
        target_repr = targets["representation_target"]
        representation = main_features(cfg, target_repr, retrieved, average)
        aux_input = None
        if full is not None and want_full:
            aux_input = main_features(cfg, target_repr, full, None)
        heads = _Heads(cfg.init_std, bool(cfg.eval_batchnorm_uses_batch_stats), name="head")
        logits, aux_logits = heads(representation, aux_input, train, example_mask)
        outputs = dict(outputs, representation=representation, logits=logits)
        if cfg.use_aux_loss and aux_logits is not None:
            outputs["aux_logits"] = aux_logits
            outputs["aux_prob"] = jax.nn.softmax(aux_logits, axis=-1) + PROBABILITY_EPS
        outputs["prob"] = jax.nn.softmax(logits, axis=-1) + PROBABILITY_EPS
        return outputs


def main_features(
    cfg: ModelSpec, target_repr: jax.Array, retrieved: jax.Array, average: jax.Array | None
) -> jax.Array:
    """The MLP input `[B, F]` in SPEC order: target representation, the retrieved aggregate,
    the history average (None without `use_long_seq_average`); then, with the cross feature
    (TR), the target times the aggregate (and the average). `only_odot` keeps the products."""
    extra = [] if average is None else [average]
    features = [] if cfg.only_odot else [target_repr, retrieved, *extra]
    if cfg.use_cross_feature:
        features += [target_repr * x for x in (retrieved, *extra)]
    return jnp.concatenate(features, axis=-1)


class _Heads(nn.Module):
    """Main head (`head/main/...`) and, given an input, the auxiliary head (`head/aux/...`)."""

    init_std: float = 0.01
    use_batch_stats_at_eval: bool = False

    @nn.compact
    def __call__(self, main_input, aux_input, train: bool, example_mask: jax.Array | None):
        def head(hidden: tuple[int, ...], name: str, x: jax.Array) -> jax.Array:
            mlp = MLPHead(hidden, self.init_std, self.use_batch_stats_at_eval, name=name)
            return mlp(x, train, example_mask)

        main = head(MAIN_HEAD_HIDDEN, "main", main_input)
        return main, None if aux_input is None else head(AUX_HEAD_HIDDEN, "aux", aux_input)
