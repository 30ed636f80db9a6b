"""Variants as data: which embedding tables exist, who shares them, which projections, which
score, which search.

Every vector the model uses plays one of four ROLES: the attention vector of the target
(the search query), the attention vector of a behaviour (a search key), the representation
of the target, the representation of a behaviour (a search value). A variant says, per role,
which table GROUP it reads (roles that read the same group share tables) and which projection
GROUP maps it (roles that name the same projection group share the map).

Parameter paths follow from the group names: `embed/<table group>/<field>` for tables,
`project/<projection group>/<field>/...` for per-field maps and `project/<projection group>/...`
for maps after concatenation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Models of the paper's comparison that the official code lacks (no official `model_name`),
# written from their own papers; each is the two-stage model with its own search strategy.
OWN_SEARCH_NAMES: tuple[str, ...] = ("eta", "sdim", "twin_v2")

# Official `model_name` strings (github thuml/DARE) -> our names.
OFFICIAL_TO_CANONICAL: dict[str, str] = {
    "DARE": "dare",
    "twin": "twin",
    "DIN": "din",
    "four_embedding": "twin_4e",
    "three_embedding": "three_embedding",
    **{
        name: name
        for name in (
            "projection",
            "projection_two_linear",
            "projection_with_mlp",
            "projection_no_item",
            "projection_only_time",
            "projection_only_category",
            "projection_only_item",
            "projection_large_emb_small_output",
        )
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
    if name in CANONICAL_NAMES:
        return name
    if name in OFFICIAL_TO_CANONICAL:
        return OFFICIAL_TO_CANONICAL[name]
    known = sorted(set(CANONICAL_NAMES) | set(OFFICIAL_TO_CANONICAL))
    raise ValueError(f"model config field 'name': unknown model name {name!r}; known: {known}")


ROLES: tuple[str, ...] = (
    "attention_target",
    "attention_behavior",
    "representation_target",
    "representation_behavior",
)
FIELDS: tuple[str, ...] = ("item", "category", "time")

# Table layouts, role -> table group (the group name is the parameter path under `embed/`).
_ONE_TABLE = {role: "shared" for role in ROLES}
_TWO_TABLES = {
    "attention_target": "attention",
    "attention_behavior": "attention",
    "representation_target": "representation",
    "representation_behavior": "representation",
}
_THREE_TABLES = {
    "attention_target": "attention_target",
    "attention_behavior": "attention_behavior",
    "representation_target": "representation",
    "representation_behavior": "representation",
}
_FOUR_TABLES = {role: role for role in ROLES}
# Projection sharing: one map per role, or one per kind (target and behaviour share).
_PER_ROLE = {role: role for role in ROLES}
_PER_KIND = {role: role.split("_")[0] for role in ROLES}


@dataclasses.dataclass(frozen=True)
class ProjectionSpec:
    """Linear maps (or small MLPs) applied to embeddings before search and aggregation.

    per_field: True -> one map per field (item/category/time) on that field's embedding;
      False -> one map on the concatenated vector.
    fields: the fields that are mapped (per_field only); the others pass through.
    groups: role -> projection group (roles with the same group share the map).
    use_bias: whether the linear layers have a bias.
    hidden: hidden sizes of an MLP (PReLU between layers); () for a single linear map.
    output_dim: per-field output width; None keeps the input width.
    """

    per_field: bool
    fields: tuple[str, ...]
    groups: dict[str, str]
    use_bias: bool
    hidden: tuple[int, ...] = ()
    output_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """Everything that distinguishes one model of the zoo from another.

    name / official_name: ours and the official `model_name`.
    tables: role -> table group (see module docstring).
    table_dims: table group -> {field: width}.
    projection: the projection maps, or None.
    score: 'dot' (scaled dot product, TWIN family) or 'din_mlp' (DIN's learnable MLP).
    has_attention_tables: the attention has tables of its own (DARE's decoupling).
    observes_gradients: a single-table variant whose shared tables are kept as two
      synchronised copies, `attention` and `representation`, so that the gradient hooks
      (observe_attn_repr_grad / avoid_domination, `dare_jax.models.gradient_paths`) see
      each path's gradient.
    search: the first stage, a key of `dare_jax.models.model.SEARCHES`: 'soft' (top-k of the
      scores), 'hard' (SIM's category search), 'eta', 'sdim' or 'twin_v2'.
    """

    name: str
    official_name: str
    tables: dict[str, str]
    table_dims: dict[str, dict[str, int]]
    projection: ProjectionSpec | None
    score: str
    has_attention_tables: bool
    observes_gradients: bool
    search: str

    @property
    def table_groups(self) -> tuple[str, ...]:
        """Distinct table groups in a fixed order (roles' order of first use)."""
        seen: list[str] = []
        for role in ROLES:
            if self.tables[role] not in seen:
                seen.append(self.tables[role])
        return tuple(seen)


def _projection_spec(name: str, options: Any) -> ProjectionSpec | None:
    if not name.startswith("projection"):
        return None
    # (projection_two_linear is after-concat only; ModelSpec refuses it otherwise.)
    if options.mlp_position_after_concat or name == "projection_two_linear":
        if name == "projection":
            return ProjectionSpec(False, (), dict(_PER_ROLE), use_bias=True)
        return ProjectionSpec(False, (), dict(_PER_KIND), use_bias=True)  # two_linear
    if name == "projection":
        return ProjectionSpec(True, FIELDS, dict(_PER_ROLE), use_bias=False)
    if name == "projection_with_mlp":
        hidden = tuple(options.mlp_hidden_layer)
        return ProjectionSpec(True, FIELDS, dict(_PER_KIND), use_bias=True, hidden=hidden)
    fields = {
        "projection_no_item": ("category", "time"),
        "projection_only_time": ("time",),
        "projection_only_category": ("category",),
        "projection_only_item": ("item",),
        "projection_large_emb_small_output": FIELDS,
    }[name]
    out = LARGE_EMB_SMALL_OUTPUT_DIM if name.endswith("small_output") else None
    return ProjectionSpec(True, fields, dict(_PER_KIND), use_bias=False, output_dim=out)


def resolve_variant(options: Any) -> VariantSpec:
    """The VariantSpec of a model's options (a `dare_jax.models.spec.ModelSpec`; its name
    canonical): every fact derived from the options is decided here."""
    name = options.name
    observes = bool(options.observe_attn_repr_grad or options.avoid_domination)
    decoupled = name in DECOUPLED_NAMES or (
        name in OWN_SEARCH_NAMES and bool(options.decoupled_tables)
    )
    if name == "twin_4e":
        tables = dict(_FOUR_TABLES)
    elif name == "three_embedding":
        tables = dict(_THREE_TABLES)
    elif observes or decoupled:
        tables = dict(_TWO_TABLES)
    else:
        tables = dict(_ONE_TABLE)
    table_dims = {}
    for role in ROLES:
        kind = "attention" if role.startswith("attention") else "representation"
        table_dims[tables[role]] = options.embedding_dims(kind)
    if name in OWN_SEARCH_NAMES:
        search = name
    else:
        search = "soft" if options.soft_search else "hard"
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
