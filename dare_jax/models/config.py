"""Model configuration: defaults (the paper's), official-name aliases and validation.

A model is chosen by `name` (ours or the official `model_name` string) plus a few switches;
`dare_jax.models.variants.resolve_variant` turns the pair into data (which tables exist, who
shares them, which projections, which search).
"""

from __future__ import annotations

import ml_collections

# Models of the paper's comparison that the official code lacks (no official `model_name`),
# built by `dare_jax.models.long_model.LongHistoryModel` (written from their own papers).
LONG_HISTORY_NAMES: tuple[str, ...] = ("eta", "sdim", "twin_v2")

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

# Our variant names. Each maps to exactly one official `model_name`.
CANONICAL_NAMES: tuple[str, ...] = tuple(OFFICIAL_TO_CANONICAL.values())
CANONICAL_TO_OFFICIAL: dict[str, str] = {v: k for k, v in OFFICIAL_TO_CANONICAL.items()}

# Variants whose attention and representation share one table per field (the ones the
# gradient-observation hooks can decouple into two synchronised copies).
SINGLE_TABLE_NAMES: frozenset[str] = frozenset(
    {"twin", "din"} | {n for n in CANONICAL_NAMES if n.startswith("projection")}
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
    # ETA / SDIM / TWIN-V2 and long histories (chunked search, bfloat16 scores): the fields
    # and their meaning are in dare_jax.models.long_model.LONG_MODEL_DEFAULTS.
    from dare_jax.models.long_model import LONG_MODEL_DEFAULTS

    for key, value in LONG_MODEL_DEFAULTS.items():
        cfg[key] = value
    return cfg


def canonical_name(name: str) -> str:
    """Our variant name for `name` (ours or an official `model_name`); ValueError if unknown."""
    if name in CANONICAL_NAMES or name in LONG_HISTORY_NAMES:
        return name
    if name in OFFICIAL_TO_CANONICAL:
        return OFFICIAL_TO_CANONICAL[name]
    known = sorted(set(CANONICAL_NAMES) | set(OFFICIAL_TO_CANONICAL) | set(LONG_HISTORY_NAMES))
    raise ValueError(f"model config field 'name': unknown model name {name!r}; known: {known}")


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
    from dare_jax.models import long_model  # late: long_model builds on this module

    if long_model.uses_long_model(cfg):
        long_model.validate_long_model_config(cfg, item_n, cate_n, max_length)
        return
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
        if int(cfg[key]) != -1 and name not in ("dare", "three_embedding", "twin_4e"):
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
        if name not in SINGLE_TABLE_NAMES:
            _fail(field, True, f"needs a variant with one shared table per field, not {name!r}")
    if float(cfg.init_std) <= 0:
        _fail("init_std", cfg.init_std, "must be positive")
