"""A model's options as an immutable, validated spec (`ModelSpec`), and the model names.

A model is chosen by `name` (ours or the official `model_name` string) plus options; the spec
checks them once, on construction, and derives its `variant` (`dare_jax.models.variants`:
which tables exist, who shares them, which projections, which search). The defaults are the
paper's: DARE, dims 16, soft search top-20, TR and the aux loss on.
"""

from __future__ import annotations

import dataclasses

from dare_jax.models.variants import (
    AFTER_CONCAT_PROJECTION_NAMES,
    FIELDS,
    OWN_SEARCH_NAMES,
    PER_FIELD_PROJECTION_NAMES,
    SINGLE_TABLE_NAMES,
    VariantSpec,
    canonical_name,
    resolve_variant,
)

SCORE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model options (config section `model`); ValueError naming the field on a bad one.
    Attention dims of -1 are the representation dims of that field. Beyond the official
    constructor's options: `official_parameters_always` builds the aux head and the time
    tables even when unused, as the official constructor does (parameter counts, the L2
    penalty and weight import then match it); `init_from` is a PyTorch `state_dict` (`.pth`)
    or an `.npz` of it to start every seed from (`dare_jax.interop.torch_weights`)."""

    name: str = "dare"
    item_embedding_dim: int = 16
    category_embedding_dim: int = 16
    time_embedding_dim: int = 16
    attention_item_embedding_dim: int = -1
    attention_category_embedding_dim: int = -1
    attention_time_embedding_dim: int = -1
    use_cross_feature: bool = True
    use_aux_loss: bool = True
    use_time: bool = True
    time_mode: str = "concat"  # 'concat' | 'add'
    soft_search: bool = True
    top_k: int = 20
    use_long_seq_average: bool = False
    only_odot: bool = False
    mlp_position_after_concat: bool = False
    mlp_hidden_layer: tuple[int, ...] = (32,)
    observe_attn_repr_grad: bool = False
    avoid_domination: bool = False
    eval_batchnorm_uses_batch_stats: bool = False
    init_std: float = 0.01
    time_table_size: int = 2000
    official_parameters_always: bool = True
    init_from: str = ""
    # Memory and speed of every search that scores the history, not its maths:
    search_chunk: int = 0  # history positions per chunk (linear memory in L); 0: all at once
    score_dtype: str = "float32"  # 'float32' | 'bfloat16' (score products; float32 sums)
    decoupled_tables: bool = False  # ETA, SDIM, TWIN-V2 with DARE's two kinds of tables
    hash_bits: int = 32  # ETA: SimHash signature bits (m)
    hash_seed: int = 0  # ETA and SDIM: seed of the fixed random hyperplanes
    sdim_hash_bits: int = 48  # SDIM: hyperplanes (m)
    sdim_group_bits: int = 3  # SDIM: bits per bucket signature (tau)
    cluster_max_size: int = 8  # TWIN-V2: clusters are split until at most this many members
    cluster_iterations: int = 3  # TWIN-V2: Lloyd steps per bisection
    variant: VariantSpec = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "name", canonical_name(str(self.name)))
        object.__setattr__(self, "mlp_hidden_layer", tuple(int(h) for h in self.mlp_hidden_layer))
        variant = resolve_variant(self)
        _validate(self, variant)
        object.__setattr__(self, "variant", variant)

    def replace(self, **changes) -> ModelSpec:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def embedding_dims(self, kind: str) -> dict[str, int]:
        """{field: width} of the 'attention' or 'representation' tables."""
        prefix = "attention_" if kind == "attention" else ""
        dims = {}
        for field in FIELDS:
            width = int(getattr(self, f"{prefix}{field}_embedding_dim"))
            dims[field] = width if width != -1 else int(getattr(self, f"{field}_embedding_dim"))
        return dims

    def check_history_length(self, max_length: int) -> None:
        """ValueError unless the model can read histories of `max_length` behaviours."""
        if int(max_length) < 1:
            _fail("max_length", max_length, "must be a positive integer")
        if self.top_k > max_length:
            _fail("top_k", self.top_k, f"must be in 1..max_length ({max_length})")
        if self.time_table_size <= max_length:
            why = f"must exceed max_length ({max_length}): history time ids run 1..max_length"
            _fail("time_table_size", self.time_table_size, why)


def _fail(field: str, value: object, why: str) -> None:
    raise ValueError(f"model config field {field!r} = {value!r}: {why}")


def _validate(spec: ModelSpec, variant: VariantSpec) -> None:
    """The official constructor's assertions (DIN without time, only_odot needs TR, attention
    dims only for decoupled variants, "add" widths), and those it leaves to a crash."""
    name = spec.name
    for field in FIELDS:
        key = f"{field}_embedding_dim"
        if getattr(spec, key) < 1:
            _fail(key, getattr(spec, key), "must be a positive integer")
        key = f"attention_{field}_embedding_dim"
        value = getattr(spec, key)
        if value != -1 and value < 1:
            _fail(key, value, "must be -1 (same as representation) or a positive integer")
        if value != -1 and not variant.has_attention_tables:
            _fail(key, value, f"separate attention dims need a decoupled variant, not {name!r}")
    if spec.time_mode not in ("concat", "add"):
        _fail("time_mode", spec.time_mode, "must be 'concat' or 'add'")
    if spec.use_time and spec.time_mode == "add":
        for kind in ("representation", "attention"):
            d = spec.embedding_dims(kind)
            if d["time"] != d["item"] + d["category"]:
                key = f"{'attention_' if kind == 'attention' else ''}time_embedding_dim"
                why = f"time mode 'add' needs it to equal the {kind} item + category dims "
                _fail(key, d["time"], why + f"({d['item']} + {d['category']})")
    if not spec.use_time and spec.time_mode == "concat" and name != "din":
        # Without time the official score still splits the vector at its last
        # attention_time_embedding_dim entries (see search.dot_product_scores).
        d = spec.embedding_dims("attention")
        if d["time"] >= d["item"] + d["category"]:
            _fail(
                "attention_time_embedding_dim",
                d["time"],
                f"without time the score splits the {d['item'] + d['category']}-wide attention "
                "vector at its last attention_time_embedding_dim entries, so it must be "
                "smaller than that width",
            )
    if name == "din" and spec.use_time:
        _fail("use_time", spec.use_time, "DIN uses no time field (official assertion)")
    concat_time = spec.use_time and spec.time_mode == "concat"
    if name == "projection_large_emb_small_output" and not concat_time:
        _fail("use_time", spec.use_time, f"{name} needs time in mode 'concat' (output is 3 x 16)")
    if spec.only_odot and not spec.use_cross_feature:
        _fail("only_odot", spec.only_odot, "needs use_cross_feature=True")
    if spec.top_k < 1:
        _fail("top_k", spec.top_k, "must be positive")
    after_concat = spec.mlp_position_after_concat
    if name in PER_FIELD_PROJECTION_NAMES - AFTER_CONCAT_PROJECTION_NAMES and after_concat:
        _fail("mlp_position_after_concat", True, f"{name} has per-field maps only (official)")
    if name in AFTER_CONCAT_PROJECTION_NAMES - PER_FIELD_PROJECTION_NAMES and not after_concat:
        _fail("mlp_position_after_concat", False, f"{name} maps the concatenation only (official)")
    hidden = spec.mlp_hidden_layer
    if name == "projection_with_mlp" and (len(hidden) not in (1, 2) or any(h < 1 for h in hidden)):
        _fail("mlp_hidden_layer", hidden, "needs one or two positive hidden sizes")
    if spec.observe_attn_repr_grad or spec.avoid_domination:
        field = "observe_attn_repr_grad" if spec.observe_attn_repr_grad else "avoid_domination"
        if name == "sdim":
            _fail(field, True, "needs an attention to observe, and SDIM has none")
        if name not in SINGLE_TABLE_NAMES or variant.has_attention_tables:
            _fail(field, True, f"needs a variant with one shared table per field, not {name!r}")
    if spec.init_std <= 0:
        _fail("init_std", spec.init_std, "must be positive")
    if spec.search_chunk < 0:
        _fail("search_chunk", spec.search_chunk, "must be 0 (no chunks) or positive")
    if spec.score_dtype not in SCORE_DTYPES:
        _fail("score_dtype", spec.score_dtype, f"must be one of {list(SCORE_DTYPES)}")
    if name in OWN_SEARCH_NAMES and not spec.soft_search:
        _fail("soft_search", spec.soft_search, f"{name} has its own search; hard search is TWIN's")
    if name == "eta" and spec.hash_bits < 1:
        _fail("hash_bits", spec.hash_bits, "must be positive")
    if name == "sdim":
        bits, tau = spec.sdim_hash_bits, spec.sdim_group_bits
        if tau < 1 or bits < 1 or bits % tau:
            _fail("sdim_group_bits", tau, f"must be positive and divide sdim_hash_bits ({bits})")
        if spec.use_aux_loss:
            _fail("use_aux_loss", True, "SDIM has no attention, so no full-attention aux head")
    if name == "twin_v2" and spec.cluster_max_size < 1:
        _fail("cluster_max_size", spec.cluster_max_size, "must be positive")
    if name == "twin_v2" and spec.cluster_iterations < 0:
        _fail("cluster_iterations", spec.cluster_iterations, "must be 0 or more")
