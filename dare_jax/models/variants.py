"""Variants as data: which embedding tables exist, who shares them, which projections, which
score, which search.

Every vector plays one of four ROLES: the attention vector of the target (the search query)
or of a behaviour (a key), the representation of the target or of a behaviour (a value). A
variant says, per role, which table GROUP it reads and which projection GROUP maps it (roles
of one group share it). Parameter paths follow: `embed/<table group>/<field>`,
`project/<projection group>/<field>/...` (per-field maps), `project/<projection group>/...`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Models of the paper's comparison that the official code lacks, written from their papers.
OWN_SEARCH_NAMES: tuple[str, ...] = ("eta", "sdim", "twin_v2")

# Official `model_name` strings (github thuml/DARE) -> our names.
OFFICIAL_TO_CANONICAL: dict[str, str] = {
    "DARE": "dare",
    "twin": "twin",
    "DIN": "din",
    "four_embedding": "twin_4e",
    "three_embedding": "three_embedding",
    **{
        f"projection{suffix}": f"projection{suffix}"
        for suffix in ("", "_two_linear", "_with_mlp", "_no_item", "_only_time")
        + ("_only_category", "_only_item", "_large_emb_small_output")
    },
}
CANONICAL_NAMES: tuple[str, ...] = tuple(OFFICIAL_TO_CANONICAL.values()) + OWN_SEARCH_NAMES
CANONICAL_TO_OFFICIAL: dict[str, str] = {
    **{name: name for name in OWN_SEARCH_NAMES},
    **{v: k for k, v in OFFICIAL_TO_CANONICAL.items()},
}
# Variants with separate attention tables (ETA, SDIM and TWIN-V2 too with decoupled_tables).
DECOUPLED_NAMES: frozenset[str] = frozenset({"dare", "three_embedding", "twin_4e"})
# Variants whose attention and representation share one table per field: the ones the
# gradient-observation hooks can split into two synchronised copies (SDIM has no attention).
SINGLE_TABLE_NAMES: frozenset[str] = frozenset(
    {"twin", "din", "eta", "twin_v2"} | {n for n in CANONICAL_NAMES if n.startswith("projection")}
)
# Projection variants that map each field (official mlp_position_after_concat=False) or the
# concatenated vector (True); `projection` does either.
PER_FIELD_PROJECTION_NAMES: frozenset[str] = frozenset(
    n for n in CANONICAL_NAMES if n.startswith("projection") and n != "projection_two_linear"
)
AFTER_CONCAT_PROJECTION_NAMES: frozenset[str] = frozenset({"projection", "projection_two_linear"})
# Output width of every per-field map of `projection_large_emb_small_output` (official: 16).
LARGE_EMB_SMALL_OUTPUT_DIM = 16


def canonical_name(name: str) -> str:
    """Our variant name for `name` (ours or an official `model_name`); ValueError if unknown."""
    if name in CANONICAL_NAMES or name in OFFICIAL_TO_CANONICAL:
        return OFFICIAL_TO_CANONICAL.get(name, name)
    known = sorted(set(CANONICAL_NAMES) | set(OFFICIAL_TO_CANONICAL))
    raise ValueError(f"model config field 'name': unknown model name {name!r}; known: {known}")


ROLES: tuple[str, ...] = (
    "attention_target",
    "attention_behavior",
    "representation_target",
    "representation_behavior",
)
FIELDS: tuple[str, ...] = ("item", "category", "time")
# Per role: one map (or table) per role, or one per kind (attention / representation).
_PER_ROLE = {role: role for role in ROLES}
_PER_KIND = {role: role.split("_")[0] for role in ROLES}


@dataclasses.dataclass(frozen=True)
class ProjectionSpec:
    """Linear maps (or small MLPs) applied to embeddings before search and aggregation."""

    per_field: bool  # one map per field (on its embedding), else one on the concatenation
    fields: tuple[str, ...]  # the mapped fields (per_field only); the others pass through
    groups: dict[str, str]  # role -> projection group (roles of one group share the map)
    use_bias: bool
    hidden: tuple[int, ...] = ()  # hidden sizes of an MLP (PReLU between); () a linear map
    output_dim: int | None = None  # per-field output width; None keeps the input width


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """Everything that distinguishes one model of the zoo from another. observes_gradients: a
    single-table variant whose shared tables are kept as two synchronised copies, `attention`
    and `representation`, so that the hooks of `gradient_paths` see each path's gradient."""

    name: str
    official_name: str  # the official `model_name`
    tables: dict[str, str]  # role -> table group
    table_dims: dict[str, dict[str, int]]  # table group -> {field: width}
    projection: ProjectionSpec | None
    score: str  # 'dot' (scaled dot product, TWIN family) or 'din_mlp' (DIN's learnable MLP)
    has_attention_tables: bool  # the attention has tables of its own (DARE's decoupling)
    observes_gradients: bool
    # A key of `dare_jax.models.model.SEARCHES`: 'soft' (top-k of the scores), 'hard' (SIM's
    # category search), 'eta', 'sdim' or 'twin_v2'.
    search: str

    @property
    def table_groups(self) -> tuple[str, ...]:
        """Distinct table groups in a fixed order (roles' order of first use)."""
        return tuple(dict.fromkeys(self.tables[role] for role in ROLES))


def _projection_spec(name: str, options: Any) -> ProjectionSpec | None:
    if not name.startswith("projection"):
        return None
    # (projection_two_linear is after-concat only; ModelSpec refuses it otherwise.)
    groups = dict(_PER_ROLE if name == "projection" else _PER_KIND)
    if options.mlp_position_after_concat or name == "projection_two_linear":
        return ProjectionSpec(False, (), groups, use_bias=True)
    if name == "projection":
        return ProjectionSpec(True, FIELDS, groups, use_bias=False)
    if name == "projection_with_mlp":
        hidden = tuple(options.mlp_hidden_layer)
        return ProjectionSpec(True, FIELDS, groups, use_bias=True, hidden=hidden)
    fields = {
        "projection_no_item": ("category", "time"),
        "projection_only_time": ("time",),
        "projection_only_category": ("category",),
        "projection_only_item": ("item",),
        "projection_large_emb_small_output": FIELDS,
    }[name]
    out = LARGE_EMB_SMALL_OUTPUT_DIM if name.endswith("small_output") else None
    return ProjectionSpec(True, fields, groups, use_bias=False, output_dim=out)


def resolve_variant(options: Any) -> VariantSpec:
    """The VariantSpec of a model's options (a `dare_jax.models.spec.ModelSpec`; its name
    canonical): every fact derived from the options is decided here."""
    name = options.name
    observes = bool(options.observe_attn_repr_grad or options.avoid_domination)
    decoupled = name in DECOUPLED_NAMES or (
        name in OWN_SEARCH_NAMES and bool(options.decoupled_tables)
    )
    # Table layouts: one shared group, two (per kind), three (per attention role) or four.
    if name == "twin_4e":
        tables = dict(_PER_ROLE)
    elif name == "three_embedding":
        tables = {r: r if r.startswith("attention") else "representation" for r in ROLES}
    else:
        tables = dict(_PER_KIND) if observes or decoupled else {r: "shared" for r in ROLES}
    table_dims = {tables[role]: options.embedding_dims(role.split("_")[0]) for role in ROLES}
    search = name if name in OWN_SEARCH_NAMES else "soft" if options.soft_search else "hard"
    return VariantSpec(
        name=name,
        official_name=CANONICAL_TO_OFFICIAL[name],
        tables=tables,
        table_dims=table_dims,
        projection=_projection_spec(name, options),
        score="din_mlp" if name == "din" else "dot",
        has_attention_tables=decoupled,
        observes_gradients=observes,
        search=search,
    )
