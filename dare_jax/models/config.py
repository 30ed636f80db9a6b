"""Model configuration: defaults (the paper's), official-name aliases and validation.

A model is chosen by `name` (ours or the official `model_name` string) plus a few switches;
`dare_jax.models.variants.resolve_variant` turns the pair into data (which tables exist, who
shares them, which projections, which search).
"""

from __future__ import annotations

import ml_collections

# Models of the paper's comparison that the official code lacks (no official `model_name`),
# written from their own papers; each is the two-stage model with its own search strategy.
OWN_SEARCH_NAMES: tuple[str, ...] = ("eta", "sdim", "twin_v2")
SCORE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")

# Official `model_name` strings (github thuml/DARE) -> our names.
OFFICIAL_TO_CANONICAL: dict[str, str] = {
    "DARE": "dare",
    "twin": "twin",
    "DIN": "din",
    "four_embedding": "twin_4e",
    "three_embedding": "three_embedding",
    "projection": "projection",
    "projection_two_linear": "projection_two_linear",
    "projection_with_mlp": "projection_with_mlp",
    "projection_no_item": "projection_no_item",
    "projection_only_time": "projection_only_time",
    "projection_only_category": "projection_only_category",
    "projection_only_item": "projection_only_item",
    "projection_large_emb_small_output": "projection_large_emb_small_output",
}

# Our variant names: one per official `model_name`, then ETA, SDIM and TWIN-V2 (whose
# "official name" is their own).
CANONICAL_NAMES: tuple[str, ...] = tuple(OFFICIAL_TO_CANONICAL.values()) + OWN_SEARCH_NAMES
CANONICAL_TO_OFFICIAL: dict[str, str] = {
    **{name: name for name in OWN_SEARCH_NAMES},
    **{v: k for k, v in OFFICIAL_TO_CANONICAL.items()},
}

# Variants with separate attention tables (ETA, SDIM and TWIN-V2 too with decoupled_tables).
DECOUPLED_NAMES: frozenset[str] = frozenset({"dare", "three_embedding", "twin_4e"})
# Variants whose attention and representation share one table per field (the ones the
# gradient-observation hooks can decouple into two synchronised copies; SDIM has no attention).
SINGLE_TABLE_NAMES: frozenset[str] = frozenset(
    {"twin", "din", "eta", "twin_v2"} | {n for n in CANONICAL_NAMES if n.startswith("projection")}
)
# Projection variants that map each field separately (official mlp_position_after_concat=False).
PER_FIELD_PROJECTION_NAMES: frozenset[str] = frozenset(
    {
        "projection",
        "projection_with_mlp",
        "projection_no_item",
        "projection_only_time",
        "projection_only_category",
        "projection_only_item",
        "projection_large_emb_small_output",
    }
)
# Projection variants that map the concatenated vector (official mlp_position_after_concat=True).
AFTER_CONCAT_PROJECTION_NAMES: frozenset[str] = frozenset({"projection", "projection_two_linear"})

# Output width of every per-field map of `projection_large_emb_small_output` (official: 16).
LARGE_EMB_SMALL_OUTPUT_DIM = 16


def default_model_config() -> ml_collections.ConfigDict:
    """The paper's model defaults (DARE, dims 16, soft search top-20, TR and aux loss on).

    Fields beyond the contract:
      official_parameters_always: build the auxiliary head and the time tables even when
        they are unused (aux loss off / no time), exactly as the official constructor does, so
        that parameter counts, the L2 penalty and weight import match it. Default True.
      row_sparse_embedding_grads: table lookups read stop_gradient(table) and expose their
        gradient as rows (Flax `perturbations` collection, ids sown in `embedding_ids`), so a
        training step never forms a dense table gradient (dare_jax.optim applies the exact
        dense Adam from the rows). Only active when `perturbations` are passed to apply;
        a plain `jax.grad` step still gets dense table gradients. Same forward values.
        Default False; the trainer sets it from `optim.sparse_table_updates`
        (`dare_jax.steps.training_model_config`).
      init_from: path of initial weights from the official code, a PyTorch `state_dict`
        (`.pth`, needs torch) or an `.npz` of it (`dare_jax.interop.torch_weights`); the
        trainer starts every seed from them instead of its own initialisation. '' = ours.
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "dare"
    cfg.item_embedding_dim = 16
    cfg.category_embedding_dim = 16
    cfg.time_embedding_dim = 16
    # -1: the same as the representation dimension of that field.
    cfg.attention_item_embedding_dim = -1
    cfg.attention_category_embedding_dim = -1
    cfg.attention_time_embedding_dim = -1
    cfg.use_cross_feature = True
    cfg.use_aux_loss = True
    cfg.use_time = True
    cfg.time_mode = "concat"
    cfg.soft_search = True
    cfg.top_k = 20
    cfg.use_long_seq_average = False
    cfg.only_odot = False
    cfg.mlp_position_after_concat = False
    cfg.mlp_hidden_layer = (32,)
    cfg.observe_attn_repr_grad = False
    cfg.avoid_domination = False
    cfg.eval_batchnorm_uses_batch_stats = False
    cfg.init_std = 0.01
    cfg.time_table_size = 2000
    cfg.official_parameters_always = True
    cfg.row_sparse_embedding_grads = False
    cfg.init_from = ""
    # Options of every search that scores the history (memory and speed, not the maths):
    cfg.search_chunk = 0  # history positions per chunk (linear memory in L); 0: all at once
    cfg.score_dtype = "float32"  # 'float32' | 'bfloat16' (score products; float32 sums)
    # ETA, SDIM and TWIN-V2:
    cfg.decoupled_tables = False  # with DARE's attention / representation tables
    cfg.hash_bits = 32  # ETA: SimHash signature bits (m)
    cfg.hash_seed = 0  # ETA and SDIM: seed of the fixed random hyperplanes
    cfg.sdim_hash_bits = 48  # SDIM: hyperplanes (m)
    cfg.sdim_group_bits = 3  # SDIM: bits per bucket signature (tau)
    cfg.cluster_max_size = 8  # TWIN-V2: clusters are split until at most this many members
    cfg.cluster_iterations = 3  # TWIN-V2: Lloyd steps per bisection
    return cfg


def canonical_name(name: str) -> str:
    """Our variant name for `name` (ours or an official `model_name`); ValueError if unknown."""
    if name in CANONICAL_NAMES:
        return name
    if name in OFFICIAL_TO_CANONICAL:
        return OFFICIAL_TO_CANONICAL[name]
    known = sorted(set(CANONICAL_NAMES) | set(OFFICIAL_TO_CANONICAL))
    raise ValueError(f"model config field 'name': unknown model name {name!r}; known: {known}")


def has_attention_tables(cfg: ml_collections.ConfigDict) -> bool:
    """True if the variant keeps separate attention tables (DARE's decoupling)."""
    name = canonical_name(str(cfg.name))
    return name in DECOUPLED_NAMES or (name in OWN_SEARCH_NAMES and bool(cfg.decoupled_tables))


def _field_dim(cfg: ml_collections.ConfigDict, field: str, attention: bool) -> int:
    rep = int(cfg[f"{field}_embedding_dim"])
    if not attention:
        return rep
    att = int(cfg[f"attention_{field}_embedding_dim"])
    return rep if att == -1 else att


def embedding_dims(cfg: ml_collections.ConfigDict) -> dict[str, dict[str, int]]:
    """Table widths: {'attention': {field: dim}, 'representation': {field: dim}}."""
    return {
        kind: {f: _field_dim(cfg, f, kind == "attention") for f in ("item", "category", "time")}
        for kind in ("attention", "representation")
    }


def _fail(field: str, value: object, why: str) -> None:
    raise ValueError(f"model config field {field!r} = {value!r}: {why}")


def validate_model_config(
    cfg: ml_collections.ConfigDict, item_n: int, cate_n: int, max_length: int
) -> None:
    """Raise ValueError naming the offending field and value if `cfg` cannot build a model.

    Mirrors the official constructor's assertions (DIN without time, only_odot needs the cross
    feature, attention dims only for the multi-table variants, time mode "add" widths) and adds
    the checks the official code leaves to a crash (top_k > max_length, table sizes, ...).
    """
    name = canonical_name(str(cfg.name))
    for field in ("item_n", "cate_n", "max_length"):
        value = {"item_n": item_n, "cate_n": cate_n, "max_length": max_length}[field]
        if int(value) < 1:
            _fail(field, value, "must be a positive integer")
    for field in ("item", "category", "time"):
        key = f"{field}_embedding_dim"
        if int(cfg[key]) < 1:
            _fail(key, cfg[key], "must be a positive integer")
        key = f"attention_{field}_embedding_dim"
        if int(cfg[key]) != -1 and int(cfg[key]) < 1:
            _fail(key, cfg[key], "must be -1 (same as representation) or a positive integer")
        if int(cfg[key]) != -1 and not has_attention_tables(cfg):
            _fail(key, cfg[key], f"separate attention dims need a decoupled variant, not {name!r}")
    if cfg.time_mode not in ("concat", "add"):
        _fail("time_mode", cfg.time_mode, "must be 'concat' or 'add'")
    dims = embedding_dims(cfg)
    if cfg.use_time and cfg.time_mode == "add":
        for kind in ("representation", "attention"):
            d = dims[kind]
            if d["time"] != d["item"] + d["category"]:
                prefix = "attention_" if kind == "attention" else ""
                _fail(
                    f"{prefix}time_embedding_dim",
                    d["time"],
                    f"time mode 'add' needs it to equal the {kind} item + category dims "
                    f"({d['item']} + {d['category']})",
                )
    if not cfg.use_time and cfg.time_mode == "concat" and name != "din":
        # Without time the official score still splits the vector at its last
        # attention_time_embedding_dim entries (see search.dot_product_scores).
        width = dims["attention"]["item"] + dims["attention"]["category"]
        if dims["attention"]["time"] >= width:
            _fail(
                "attention_time_embedding_dim",
                dims["attention"]["time"],
                f"without time the score splits the {width}-wide attention vector at its last "
                "attention_time_embedding_dim entries, so it must be smaller than that width",
            )
    if name == "din" and cfg.use_time:
        _fail("use_time", cfg.use_time, "DIN uses no time field (official assertion)")
    if name == "projection_large_emb_small_output" and not (
        cfg.use_time and cfg.time_mode == "concat"
    ):
        _fail("use_time", cfg.use_time, f"{name} needs time in mode 'concat' (output is 3 x 16)")
    if cfg.only_odot and not cfg.use_cross_feature:
        _fail("only_odot", cfg.only_odot, "needs use_cross_feature=True")
    if int(cfg.top_k) < 1 or int(cfg.top_k) > int(max_length):
        _fail("top_k", cfg.top_k, f"must be in 1..max_length ({max_length})")
    if int(cfg.time_table_size) <= int(max_length):
        _fail(
            "time_table_size",
            cfg.time_table_size,
            f"must exceed max_length ({max_length}): history time ids run 1..max_length",
        )
    if name in PER_FIELD_PROJECTION_NAMES - AFTER_CONCAT_PROJECTION_NAMES and (
        cfg.mlp_position_after_concat
    ):
        _fail("mlp_position_after_concat", True, f"{name} has per-field maps only (official)")
    if name in AFTER_CONCAT_PROJECTION_NAMES - PER_FIELD_PROJECTION_NAMES and not (
        cfg.mlp_position_after_concat
    ):
        _fail("mlp_position_after_concat", False, f"{name} maps the concatenation only (official)")
    if name == "projection_with_mlp":
        hidden = tuple(cfg.mlp_hidden_layer)
        if len(hidden) not in (1, 2) or any(int(h) < 1 for h in hidden):
            _fail("mlp_hidden_layer", hidden, "needs one or two positive hidden sizes")
    if cfg.observe_attn_repr_grad or cfg.avoid_domination:
        field = "observe_attn_repr_grad" if cfg.observe_attn_repr_grad else "avoid_domination"
        if name not in SINGLE_TABLE_NAMES or has_attention_tables(cfg):
            if name == "sdim":
                _fail(field, True, "needs an attention to observe, and SDIM has none")
            _fail(field, True, f"needs a variant with one shared table per field, not {name!r}")
    if float(cfg.init_std) <= 0:
        _fail("init_std", cfg.init_std, "must be positive")
    if int(cfg.search_chunk) < 0:
        _fail("search_chunk", cfg.search_chunk, "must be 0 (no chunks) or positive")
    if cfg.score_dtype not in SCORE_DTYPES:
        _fail("score_dtype", cfg.score_dtype, f"must be one of {list(SCORE_DTYPES)}")
    if name in OWN_SEARCH_NAMES and not cfg.soft_search:
        _fail("soft_search", cfg.soft_search, f"{name} has its own search; hard search is TWIN's")
    if name == "eta" and int(cfg.hash_bits) < 1:
        _fail("hash_bits", cfg.hash_bits, "must be positive")
    if name == "sdim":
        bits, tau = int(cfg.sdim_hash_bits), int(cfg.sdim_group_bits)
        if tau < 1 or bits < 1 or bits % tau:
            _fail("sdim_group_bits", tau, f"must be positive and divide sdim_hash_bits ({bits})")
        if cfg.use_aux_loss:
            _fail("use_aux_loss", True, "SDIM has no attention, so no full-attention aux head")
    if name == "twin_v2" and int(cfg.cluster_max_size) < 1:
        _fail("cluster_max_size", cfg.cluster_max_size, "must be positive")
    if name == "twin_v2" and int(cfg.cluster_iterations) < 0:
        _fail("cluster_iterations", cfg.cluster_iterations, "must be 0 or more")
