"""Embedding tables, per-role lookups and the optional projections, driven by a VariantSpec.

Tables are leaves `embed/<group>/<field>` of shape `[rows, width]`; projections live under
`project/<group>/<field>/dense_i` (per field) or `project/<group>/dense_0` (after concat).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dare_jax.models.layers import ProjectionMLP, normal_init
from dare_jax.models.variants import ROLES, ProjectionSpec, VariantSpec

RoleFields = dict[str, dict[str, jax.Array]]
Tables = dict[str, dict[str, jax.Array]]  # {group: {field: table}}
Ids = dict[str, jax.Array]  # {field: ids}
TABLE_ROOT = "embed"  # the params subtree of the embedding tables
PERTURBATIONS = "perturbations"  # collection of the row-gradient perturbations
EMBEDDING_IDS = "embedding_ids"  # collection of the ids sown with them


class TableKey(NamedTuple):
    """One embedding table, `params["embed"][group][field]`."""

    group: str
    field: str

    @property
    def path(self) -> tuple[str, str, str]:
        return (TABLE_ROOT, self.group, self.field)


class Lookup(NamedTuple):
    """One gather from a table: by the targets (`[B]` ids) or by the histories (`[B, L]`)."""

    table: TableKey
    target: bool

    @property
    def name(self) -> str:
        """Its variable name in the `perturbations` and `embedding_ids` collections."""
        return f"{self.table.group}:{self.table.field}:{'target' if self.target else 'history'}"


def _role_lookup(spec: VariantSpec, role: str, field: str) -> Lookup:
    return Lookup(TableKey(spec.tables[role], field), role.endswith("target"))


def lookups(spec: VariantSpec, fields: tuple[str, ...]) -> tuple[Lookup, ...]:
    """Every distinct gather the model makes: per table group the roles read, per field."""
    return tuple(dict.fromkeys(_role_lookup(spec, r, f) for r in ROLES for f in fields))


class TableGroup(nn.Module):
    """One embedding table per field: params `item [item_n, d]`, `category`, `time`."""

    shapes: tuple[tuple[str, int, int], ...]  # (field, rows, width)
    init_std: float = 0.01

    @nn.compact
    def __call__(self, copy_of: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        """{field: table}; copy_of: initial values to copy (synchronised copies)."""
        tables = {}
        for field, rows, width in self.shapes:
            init = normal_init(self.init_std)
            if copy_of is not None:
                init = lambda *_, value=copy_of[field]: value
            tables[field] = self.param(field, init, (rows, width))
        return tables


class EmbeddingTables(nn.Module):
    """All table groups of a variant: {group: {field: table}} (module name `embed`)."""

    spec: VariantSpec
    rows: tuple[tuple[str, int], ...]  # (field, row count) for every field that has tables
    init_std: float = 0.01

    @nn.compact
    def __call__(self) -> Tables:
        spec, groups = self.spec, {}
        # Representation groups first, so that synchronised attention copies can copy them.
        for group in sorted(spec.table_groups, key=lambda g: g.startswith("attention")):
            copy_of = None
            if spec.observes_gradients and group == "attention":
                copy_of = groups["representation"]
            shapes = tuple((f, n, spec.table_dims[group][f]) for f, n in self.rows)
            groups[group] = TableGroup(shapes, self.init_std, name=group)(copy_of)
        return groups


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of `table [N, d]` for integer `ids [...]` -> `[..., d]`; out-of-range ids give NaN."""
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


def row_perturbations(
    module: nn.Module, spec: VariantSpec, tables: Tables, ids: Ids, fields: tuple, is_target: bool
) -> dict[str, jax.Array]:
    """Table gradients as rows (the row-gradient Adams of `dare_jax.optim`): when the caller
    passes the `perturbations` collection (or makes it mutable), for every table the target
    (or behaviour) roles read, a zero perturbation `[*ids[field].shape, d]` named by its
    `Lookup` (its gradient is the rows' cotangents), the ids sown under that name in
    `embedding_ids`. Otherwise empty: the tables keep their dense gradient."""
    out: dict[str, jax.Array] = {}
    if module.is_initializing():  # init makes every collection mutable; the rows need none
        return out
    for found in lookups(spec, fields):
        name, (group, field) = found.name, found.table
        passed = module.is_mutable_collection(PERTURBATIONS) or module.has_variable(
            PERTURBATIONS, name
        )
        if found.target == is_target and passed:
            shape = ids[field].shape + tables[group][field].shape[1:]
            out[name] = module.perturb(name, jnp.zeros(shape))
            module.sow(EMBEDDING_IDS, name, ids[field])
    return out


def lookup_roles(
    spec: VariantSpec, tables: Tables, ids: Ids, fields: tuple, roles: tuple, perturbations: dict
) -> RoleFields:
    """{role: {field: rows `[*ids[field].shape, d]`}} for `roles` (all target or all behaviour
    roles). Each table is gathered once even when several roles share it. A table with a
    perturbation (`row_perturbations`) is read through `stop_gradient` and the perturbation
    added, so its gradient arrives as rows (same values)."""
    gathered: dict[str, jax.Array] = {}
    out: RoleFields = {}
    for role in roles:
        out[role] = {}
        for field in fields:
            name = _role_lookup(spec, role, field).name
            if name not in gathered:
                table = tables[spec.tables[role]][field]
                if name in perturbations:
                    rows = lookup(jax.lax.stop_gradient(table), ids[field]) + perturbations[name]
                else:
                    rows = lookup(table, ids[field])
                gathered[name] = rows
            out[role][field] = gathered[name]
    return out


def compose(parts: dict[str, jax.Array], use_time: bool, time_mode: str) -> jax.Array:
    """`[item | category | time]` (concat), `[item | category] + time` (add) or `[item | category]`;
    parts with fewer leading dims (an unbatched time part `[L, d]`) are broadcast."""
    lead = jnp.broadcast_shapes(*(p.shape[:-1] for p in parts.values()))
    parts = {f: jnp.broadcast_to(p, (*lead, p.shape[-1])) for f, p in parts.items()}
    semantic = jnp.concatenate([parts["item"], parts["category"]], axis=-1)
    if not use_time:
        return semantic
    if time_mode == "add":
        return semantic + parts["time"]
    return jnp.concatenate([semantic, parts["time"]], axis=-1)


class Projections(nn.Module):
    """The variant's projections, composing each role's vector (module name `project`):
    {role: {field: vector}} -> {role: `[..., D]`, or its parts `(item, category[, time])` where
    it is their concatenation (concat time mode, no map after concatenation), so that the
    search never builds the `[B, L, D]` concatenation}. Roles of one group share its map."""

    spec: VariantSpec
    use_time: bool
    time_mode: str
    init_std: float = 0.01
    # role -> time-table width, to build (at init only) time maps the official constructor
    # creates even without time; empty to skip them.
    unused_time_width: dict[str, int] = dataclasses.field(default_factory=dict)

    @nn.compact
    def __call__(self, role_fields: RoleFields) -> dict[str, jax.Array]:
        proj = self.spec.projection
        out: dict[str, jax.Array] = {}
        maps: dict[str, nn.Module] = {}  # projection group -> its map
        for role, parts in role_fields.items():
            group = None if proj is None else proj.groups[role]
            if proj is not None and proj.per_field:
                if group not in maps:
                    unused = self.unused_time_width.get(role, 0)
                    maps[group] = _FieldMaps(proj, unused, self.init_std, name=group)
                parts = maps[group](parts)
            if (proj is None or proj.per_field) and not (self.use_time and self.time_mode == "add"):
                out[role] = tuple(parts[f] for f in ("item", "category", "time") if f in parts)
                continue
            out[role] = compose(parts, self.use_time, self.time_mode)
            if proj is not None and not proj.per_field:
                if group not in maps:
                    width = out[role].shape[-1]
                    maps[group] = ProjectionMLP(width, (), proj.use_bias, self.init_std, name=group)
                out[role] = maps[group](out[role])
        return out


class _FieldMaps(nn.Module):
    """One ProjectionMLP per mapped field (`<field>/dense_i`); other fields pass through."""

    proj: ProjectionSpec
    unused_time_width: int = 0
    init_std: float = 0.01

    @nn.compact
    def __call__(self, parts: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out, proj = dict(parts), self.proj
        for field in proj.fields:
            # Time without use_time: the official constructor still builds the map (it counts
            # in the L2 penalty), so create it at init and never use it.
            if field not in parts and not (self.is_initializing() and self.unused_time_width):
                continue
            x = parts[field] if field in parts else jnp.zeros((1, self.unused_time_width))
            width = proj.output_dim or x.shape[-1]
            y = ProjectionMLP(width, proj.hidden, proj.use_bias, self.init_std, name=field)(x)
            if field in parts:
                out[field] = y
        return out
