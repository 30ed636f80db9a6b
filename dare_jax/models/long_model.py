"""Long-history models: ETA, SDIM, TWIN-V2, and TWIN/DARE with chunked (linear-memory) search.

Same batch, parameter paths (`embed/<group>/<field>`, `head/main/...`, `head/aux/...`) and
outputs (`prob`, `logits`, `aux_prob`, `representation`, ...) as `TwoStageModel`, so the
driver, loss, L2 penalty and metrics apply unchanged. Differences:

- the history is processed in chunks of `search_chunk` positions (`long_search`): per table,
  at most one `[B, C, D]` chunk of behaviour vectors is alive, and the backward pass
  recomputes chunk lookups instead of storing `[B, L, D]`; memory and time are linear in L;
- `score_dtype='bfloat16'` multiplies search scores in bfloat16 (float32 accumulation);
- names: 'twin', 'dare' (the same functions as TwoStageModel, chunked), 'eta', 'sdim',
  'twin_v2'. `decoupled_tables=True` gives ETA / SDIM / TWIN-V2 DARE's two tables per field
  (attention tables hash / search / cluster, representation tables are aggregated).

Extra config fields (defaults in `LONG_MODEL_DEFAULTS`): search_chunk, score_dtype,
decoupled_tables, hash_bits, hash_seed (ETA), sdim_hash_bits, sdim_group_bits (SDIM),
cluster_max_size, cluster_iterations (TWIN-V2).
Extra outputs: ETA `hamming_distance [B, L]`; SDIM `bucket_sizes [B, G]`; TWIN-V2
`cluster_ids [B, L]`, `cluster_sizes [B, S]` (and its `attention_scores`/`topk_indices` are
over the S clusters, with the ln-size bias included).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dare_jax.models import config as config_lib
from dare_jax.models import eta, long_search, sdim, twin_v2
from dare_jax.models.embeddings import EmbeddingTables, compose, lookup
from dare_jax.models.model import main_features, predict, read_batch
from dare_jax.models.search import PADDING_SCORE, mask_scores
from dare_jax.models.variants import ROLES, VariantSpec

LONG_MODEL_NAMES: tuple[str, ...] = ("eta", "sdim", "twin_v2")
CHUNKED_NAMES: tuple[str, ...] = ("twin", "dare") + LONG_MODEL_NAMES

LONG_MODEL_DEFAULTS: dict[str, object] = {
    "search_chunk": 0,  # history positions per chunk; 0: the whole history at once
    "score_dtype": "float32",  # 'float32' | 'bfloat16' (search-score products)
    "decoupled_tables": False,  # ETA/SDIM/TWIN-V2 with DARE's attention/representation tables
    "hash_bits": 32,  # ETA: SimHash signature bits (m)
    "hash_seed": 0,  # ETA and SDIM: seed of the fixed random hyperplanes
    "sdim_hash_bits": 48,  # SDIM: hyperplanes (m)
    "sdim_group_bits": 3,  # SDIM: bits per bucket signature (tau)
    "cluster_max_size": 8,  # TWIN-V2: clusters are split until at most this many members
    "cluster_iterations": 3,  # TWIN-V2: Lloyd steps per bisection
}


def long_field(cfg: ml_collections.ConfigDict, key: str):
    """cfg[key] if the config has it, else its default from LONG_MODEL_DEFAULTS."""
    return cfg[key] if key in cfg else LONG_MODEL_DEFAULTS[key]


def uses_long_model(cfg: ml_collections.ConfigDict) -> bool:
    """True if `cfg` needs LongHistoryModel: ETA/SDIM/TWIN-V2, or TWIN/DARE with chunking/bf16."""
    name = str(cfg.name)
    if name in LONG_MODEL_NAMES:
        return True
    chunked = int(long_field(cfg, "search_chunk")) > 0
    bf16 = long_field(cfg, "score_dtype") != "float32"
    return config_lib.OFFICIAL_TO_CANONICAL.get(name, name) in ("twin", "dare") and (
        chunked or bf16
    )


def _fail(field: str, value: object, why: str) -> None:
    raise ValueError(f"model config field {field!r} = {value!r}: {why}")


def validate_long_model_config(
    cfg: ml_collections.ConfigDict, item_n: int, cate_n: int, max_length: int
) -> None:
    """ValueError naming the field and value if `cfg` cannot build a LongHistoryModel."""
    name = str(cfg.name)
    if name not in LONG_MODEL_NAMES:
        name = config_lib.canonical_name(name)
    if name not in CHUNKED_NAMES:
        _fail("name", cfg.name, f"long-history models are {list(CHUNKED_NAMES)}")
    decoupled = name == "dare" or (name != "twin" and bool(long_field(cfg, "decoupled_tables")))
    # The shared checks (dims, time mode, top_k, time table size) with the table layout's name.
    base = ml_collections.ConfigDict(cfg.to_dict())
    base.name = "dare" if decoupled else "twin"
    for key in LONG_MODEL_DEFAULTS:  # the plain validator must not route back here
        if key in base:
            base[key] = LONG_MODEL_DEFAULTS[key]
    config_lib.validate_model_config(base, item_n, cate_n, max_length)
    if not cfg.soft_search:
        _fail("soft_search", cfg.soft_search, f"{name} has its own search; hard search is TWIN's")
    if cfg.get("row_sparse_embedding_grads", False):
        _fail("row_sparse_embedding_grads", True, f"not supported by {name} (LongHistoryModel)")
    if cfg.observe_attn_repr_grad or cfg.avoid_domination:
        _fail("observe_attn_repr_grad", True, f"gradient observation is for TwoStageModel ({name})")
    if int(long_field(cfg, "search_chunk")) < 0:
        _fail("search_chunk", cfg.search_chunk, "must be 0 (no chunks) or positive")
    if long_field(cfg, "score_dtype") not in long_search.SCORE_DTYPES:
        _fail("score_dtype", cfg.score_dtype, f"must be one of {list(long_search.SCORE_DTYPES)}")
    if name == "eta" and int(long_field(cfg, "hash_bits")) < 1:
        _fail("hash_bits", cfg.hash_bits, "must be positive")
    if name == "sdim":
        bits, tau = int(long_field(cfg, "sdim_hash_bits")), int(long_field(cfg, "sdim_group_bits"))
        if tau < 1 or bits < 1 or bits % tau:
            _fail("sdim_group_bits", tau, f"must be positive and divide sdim_hash_bits ({bits})")
        if cfg.use_aux_loss:
            _fail("use_aux_loss", True, "SDIM has no attention, so no full-attention aux head")
    if name == "twin_v2" and int(long_field(cfg, "cluster_max_size")) < 1:
        _fail("cluster_max_size", cfg.cluster_max_size, "must be positive")


def resolve_long_variant(cfg: ml_collections.ConfigDict) -> VariantSpec:
    """Table layout of a long-history model: one table per field, or DARE's two."""
    name = str(cfg.name)
    if name not in LONG_MODEL_NAMES:
        name = config_lib.canonical_name(name)
    decoupled = name == "dare" or (name != "twin" and bool(long_field(cfg, "decoupled_tables")))
    if decoupled:
        tables = {role: role.split("_")[0] for role in ROLES}
    else:
        tables = {role: "shared" for role in ROLES}
    dims = config_lib.embedding_dims(cfg)
    table_dims = {
        tables[role]: dict(dims["attention" if role.startswith("attention") else "representation"])
        for role in ROLES
    }
    official = config_lib.CANONICAL_TO_OFFICIAL.get(name, name)
    return VariantSpec(name, official, tables, table_dims, None, "dot", False)


class LongHistoryModel(nn.Module):
    """ETA / SDIM / TWIN-V2 / chunked TWIN and DARE (see module docstring)."""

    cfg: ml_collections.FrozenConfigDict
    spec: VariantSpec
    item_n: int
    cate_n: int
    max_length: int

    def _get(self, key: str):
        return long_field(self.cfg, key)

    def _split(self) -> int | None:
        """Width of the separately scaled time part of the attention vector (None: no split)."""
        if self.cfg.time_mode == "add":
            return None
        return self.spec.table_dims[self.spec.tables["attention_target"]]["time"]

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
        cfg, spec = self.cfg, self.spec
        inputs = read_batch(batch, batched_time=True)
        iid, cid, tid, valid = (inputs[k] for k in ("iid", "cid", "tid", "valid"))
        length = inputs["hist_iid"].shape[1]
        history = {
            "item": inputs["hist_iid"],
            "category": inputs["hist_cid"],
            "time": inputs["hist_tid"],
            "valid": valid,
        }

        rows = (("item", self.item_n), ("category", self.cate_n))
        if cfg.use_time or cfg.official_parameters_always:
            rows += (("time", int(cfg.time_table_size)),)
        tables = EmbeddingTables(spec, rows, cfg.init_std, name="embed")()
        fields = ("item", "category", "time") if cfg.use_time else ("item", "category")

        def vectors(role: str, ids: dict[str, jax.Array]) -> jax.Array:
            """The role's composed vectors `[..., D]` for ids `[...]` (per field)."""
            group = tables[spec.tables[role]]
            parts = {f: lookup(group[f], ids[f]) for f in fields}
            return compose(parts, bool(cfg.use_time), str(cfg.time_mode))

        target_ids = {"item": iid, "category": cid, "time": tid}
        query = vectors("attention_target", target_ids)
        target_repr = vectors("representation_target", target_ids)
        chunk = int(self._get("search_chunk"))
        score_dtype = str(self._get("score_dtype"))
        split = self._split()

        def history_scores(ids: dict[str, jax.Array]) -> jax.Array:
            keys = vectors("attention_behavior", ids)
            scores = long_search.scaled_dot_scores(query, keys, split, score_dtype)
            return mask_scores(scores, ids["valid"])

        def representations(ids: dict[str, jax.Array]) -> jax.Array:
            return vectors("representation_behavior", ids)

        k = int(cfg.top_k)
        outputs: dict[str, jax.Array] = {}
        full_aggregate = None
        if spec.name in ("twin", "dare", "eta"):
            need_full = spec.name != "eta" or bool(cfg.use_aux_loss)
            masked = long_search.chunked_map(history_scores, history, chunk) if need_full else None
            if spec.name == "eta":
                bits = int(self._get("hash_bits"))
                planes = eta.random_hyperplanes(bits, query.shape[-1], int(self._get("hash_seed")))
                target_sig = eta.signatures(query, planes)
                history_sig = long_search.chunked_map(
                    lambda ids: eta.signatures(vectors("attention_behavior", ids), planes),
                    history,
                    chunk,
                )
                distance = eta.hamming_distance(history_sig, target_sig)
                indices = eta.hamming_top_k(distance, valid, k, bits)
                outputs["hamming_distance"] = distance
            else:
                _, indices = jax.lax.top_k(jax.lax.stop_gradient(masked), k)
            # Second stage over the k kept: only `[B, k, D]` is gathered.
            kept = long_search.gather_history(history, indices)
            kept_scores = history_scores(kept)
            weights = jax.nn.softmax(kept_scores, axis=-1)
            retrieved = jnp.einsum("bk,bkd->bd", weights, representations(kept))
            outputs["topk_indices"] = indices
            if masked is not None:
                outputs["attention_scores"] = masked
                full_weights = jax.nn.softmax(masked, axis=-1)
                full_aggregate = long_search.chunked_weighted_sum(
                    representations, full_weights, history, chunk
                )
        elif spec.name == "sdim":
            bits, tau = int(self._get("sdim_hash_bits")), int(self._get("sdim_group_bits"))
            planes = eta.random_hyperplanes(bits, query.shape[-1], int(self._get("hash_seed")))
            target_codes = sdim.bucket_codes(query, planes, tau)
            matches = long_search.chunked_map(
                lambda ids: sdim.bucket_matches(
                    sdim.bucket_codes(vectors("attention_behavior", ids), planes, tau),
                    target_codes,
                    ids["valid"],
                ),
                history,
                chunk,
            )  # [B, L, G]
            sums = long_search.chunked_weighted_sum(representations, matches, history, chunk)
            retrieved = sdim.normalised_group_average(sums)
            outputs["bucket_sizes"] = jnp.sum(matches, axis=1, dtype=jnp.int32)
        else:  # twin_v2: clusters of the whole history (one [B, L, D] per table)
            keys = vectors("attention_behavior", history)
            labels = twin_v2.hierarchical_kmeans(
                keys,
                valid,
                int(self._get("cluster_max_size")),
                0,
                int(self._get("cluster_iterations")),
            )
            clusters = 2 ** twin_v2.cluster_levels(length, int(self._get("cluster_max_size")), 0)
            sizes = twin_v2.cluster_sizes(labels, clusters)
            cluster_keys = twin_v2.cluster_means(labels, keys, clusters)
            cluster_values = twin_v2.cluster_means(labels, representations(history), clusters)
            scores = long_search.scaled_dot_scores(query, cluster_keys, split, score_dtype)
            masked = mask_scores(scores + twin_v2.size_bias(sizes), sizes > 0)
            kc = min(k, clusters)
            _, indices = jax.lax.top_k(jax.lax.stop_gradient(masked), kc)
            weights = jax.nn.softmax(jnp.take_along_axis(masked, indices, axis=1), axis=-1)
            kept_values = jnp.take_along_axis(cluster_values, indices[:, :, None], axis=1)
            retrieved = jnp.einsum("bk,bkd->bd", weights, kept_values)
            full_aggregate = jnp.einsum(
                "bs,bsd->bd", jax.nn.softmax(masked, axis=-1), cluster_values
            )
            outputs.update(
                attention_scores=masked,
                topk_indices=indices,
                cluster_ids=labels,
                cluster_sizes=sizes,
            )

        average = None
        if cfg.use_long_seq_average:
            counts = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)
            average = long_search.chunked_weighted_sum(
                representations, valid.astype(jnp.float32), history, chunk
            ) / (counts + 1.0)
        representation = main_features(cfg, target_repr, retrieved, average)
        outputs["representation"] = representation
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


def build_long_history_model(
    cfg: ml_collections.ConfigDict, item_n: int, cate_n: int, max_length: int
) -> LongHistoryModel:
    """Validate `cfg` (ValueError naming the field) and build a LongHistoryModel."""
    validate_long_model_config(cfg, item_n, cate_n, max_length)
    return LongHistoryModel(
        ml_collections.FrozenConfigDict(cfg),
        resolve_long_variant(cfg),
        int(item_n),
        int(cate_n),
        int(max_length),
    )


__all__ = [
    "LONG_MODEL_DEFAULTS",
    "LONG_MODEL_NAMES",
    "LongHistoryModel",
    "PADDING_SCORE",
    "build_long_history_model",
    "long_field",
    "resolve_long_variant",
    "uses_long_model",
    "validate_long_model_config",
]
