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

import ml_collections

from dare_jax.models import config as config_lib

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
    synchronised_copies: the attention and representation groups are two copies of one
      shared table kept equal by the gradient hooks (observe_attn_repr_grad / avoid_domination).
    search: the first stage, a key of `dare_jax.models.model.SEARCHES`: 'soft' (top-k of the
      scores), 'hard' (SIM's category search), 'eta', 'sdim' or 'twin_v2'.
    """

    name: str
    official_name: str
    tables: dict[str, str]
    table_dims: dict[str, dict[str, int]]
    projection: ProjectionSpec | None
    score: str
    synchronised_copies: bool
    search: str

    @property
    def table_groups(self) -> tuple[str, ...]:
        """Distinct table groups in a fixed order (roles' order of first use)."""
        seen: list[str] = []
        for role in ROLES:
            if self.tables[role] not in seen:
                seen.append(self.tables[role])
        return tuple(seen)


def _projection_spec(name: str, cfg: ml_collections.ConfigDict) -> ProjectionSpec | None:
    if not name.startswith("projection"):
        return None
    if cfg.mlp_position_after_concat:
        if name == "projection":
            return ProjectionSpec(False, (), dict(_PER_ROLE), use_bias=True)
        return ProjectionSpec(False, (), dict(_PER_KIND), use_bias=True)  # two_linear
    if name == "projection":
        return ProjectionSpec(True, FIELDS, dict(_PER_ROLE), use_bias=False)
    if name == "projection_with_mlp":
        hidden = tuple(int(h) for h in cfg.mlp_hidden_layer)
        return ProjectionSpec(True, FIELDS, dict(_PER_KIND), use_bias=True, hidden=hidden)
    fields = {
        "projection_no_item": ("category", "time"),
        "projection_only_time": ("time",),
        "projection_only_category": ("category",),
        "projection_only_item": ("item",),
        "projection_large_emb_small_output": FIELDS,
    }[name]
    out = config_lib.LARGE_EMB_SMALL_OUTPUT_DIM if name.endswith("small_output") else None
    return ProjectionSpec(True, fields, dict(_PER_KIND), use_bias=False, output_dim=out)


def resolve_variant(cfg: ml_collections.ConfigDict) -> VariantSpec:
    """Turn a (validated) model config into a VariantSpec."""
    name = config_lib.canonical_name(str(cfg.name))
    synchronised = bool(cfg.observe_attn_repr_grad or cfg.avoid_domination)
    if name == "twin_4e":
        tables = dict(_FOUR_TABLES)
    elif name == "three_embedding":
        tables = dict(_THREE_TABLES)
    elif synchronised or config_lib.has_attention_tables(cfg):
        tables = dict(_TWO_TABLES)
    else:
        tables = dict(_ONE_TABLE)
    dims = config_lib.embedding_dims(cfg)
    table_dims = {}
    for role in ROLES:
        group = tables[role]
        table_dims[group] = dict(
            dims["attention" if role.startswith("attention") else "representation"]
        )
    search = "soft" if cfg.soft_search else "hard"
    return VariantSpec(
        name=name,
        official_name=config_lib.CANONICAL_TO_OFFICIAL[name],
        tables=tables,
        table_dims=table_dims,
        projection=_projection_spec(name, cfg),
        score="din_mlp" if name == "din" else "dot",
        synchronised_copies=synchronised,
        search=name if name in config_lib.OWN_SEARCH_NAMES else search,
    )
