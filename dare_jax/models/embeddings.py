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
from dare_jax.models.variants import ROLES, VariantSpec

RoleFields = dict[str, dict[str, jax.Array]]
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


def lookups(spec: VariantSpec, fields: tuple[str, ...]) -> tuple[Lookup, ...]:
    """Every distinct gather the model makes: per table group the roles read, per field."""
    found: dict[Lookup, None] = {}
    for role in ROLES:
        for field in fields:
            found[Lookup(TableKey(spec.tables[role], field), role.endswith("target"))] = None
    return tuple(found)


def _constant_init(value: jax.Array):
    """An initialiser returning `value` (the synchronised copy of another table)."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        del key, shape, dtype
        return value

    return init


class TableGroup(nn.Module):
    """One embedding table per field: params `item [item_n, d]`, `category`, `time`."""

    rows: tuple[tuple[str, int], ...]
    dims: tuple[tuple[str, int], ...]
    init_std: float = 0.01

    @nn.compact
    def __call__(self, copy_of: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        """Return {field: table}. copy_of: initial values to copy (synchronised copies)."""
        rows, dims = dict(self.rows), dict(self.dims)
        tables = {}
        for field, row_count in rows.items():
            shape = (row_count, dims[field])
            if copy_of is not None:
                init = _constant_init(copy_of[field])
            else:
                init = normal_init(self.init_std)
            tables[field] = self.param(field, init, shape)
        return tables


class EmbeddingTables(nn.Module):
    """All table groups of a variant: {group: {field: table}} (module name `embed`)."""

    spec: VariantSpec
    rows: tuple[tuple[str, int], ...]  # (field, row count) for every field that has tables
    init_std: float = 0.01

    @nn.compact
    def __call__(self) -> dict[str, dict[str, jax.Array]]:
        spec = self.spec
        groups: dict[str, dict[str, jax.Array]] = {}
        # Representation groups first, so that synchronised attention copies can copy them.
        for group in sorted(spec.table_groups, key=lambda g: g.startswith("attention")):
            copy_of = None
            if spec.observes_gradients and group == "attention":
                copy_of = groups["representation"]
            fields = tuple(f for f, _ in self.rows)
            dims = tuple((f, spec.table_dims[group][f]) for f in fields)
            groups[group] = TableGroup(self.rows, dims, self.init_std, name=group)(copy_of)
        return groups


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of `table [N, d]` for integer `ids [...]` -> `[..., d]`; out-of-range ids give NaN."""
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


def row_perturbations(
    module: nn.Module,
    spec: VariantSpec,
    tables: dict[str, dict[str, jax.Array]],
    ids: dict[str, jax.Array],
    fields: tuple[str, ...],
    is_target: bool,
) -> dict[str, jax.Array]:
    """Table gradients as rows (the row-gradient Adams of `dare_jax.optim`).

    For every table the target (or behaviour) roles read, when the caller passes the
    `perturbations` collection (or makes it mutable): a zero perturbation shaped like its
    rows, `[*ids[field].shape, d]`, named by its `Lookup` (the loss's gradient w.r.t. it is the
    rows' cotangents), with the ids sown under the same name in `embedding_ids`. Otherwise
    empty: the tables keep their dense gradient (a plain `jax.grad` step).
    """
    out: dict[str, jax.Array] = {}
    if module.is_initializing():  # init makes every collection mutable; the rows need none
        return out
    for lookup in lookups(spec, fields):
        name = lookup.name
        passed = module.is_mutable_collection(PERTURBATIONS) or module.has_variable(
            PERTURBATIONS, name
        )
        if lookup.target != is_target or not passed:
            continue
        table = tables[lookup.table.group][lookup.table.field]
        out[name] = module.perturb(name, jnp.zeros(ids[lookup.table.field].shape + table.shape[1:]))
        module.sow(EMBEDDING_IDS, name, ids[lookup.table.field])
    return out


def lookup_roles(
    spec: VariantSpec,
    tables: dict[str, dict[str, jax.Array]],
    ids: dict[str, jax.Array],
    fields: tuple[str, ...],
    roles: tuple[str, ...],
    perturbations: dict[str, jax.Array],
) -> RoleFields:
    """{role: {field: rows `[*ids[field].shape, d]`}} for `roles` (all target or all behaviour
    roles). Each table is gathered once even when several roles share it. A table with a
    perturbation (`row_perturbations`) is read through `stop_gradient` and the perturbation
    added, so its gradient arrives as rows (same values)."""
    gathered: dict[str, jax.Array] = {}
    out: RoleFields = {}
    for role in roles:
        group, out[role] = spec.tables[role], {}
        for field in fields:
            name = Lookup(TableKey(group, field), role.endswith("target")).name
            if name not in gathered:
                table = tables[group][field]
                if name in perturbations:
                    rows = lookup(jax.lax.stop_gradient(table), ids[field]) + perturbations[name]
                else:
                    rows = lookup(table, ids[field])
                gathered[name] = rows
            out[role][field] = gathered[name]
    return out


def compose(parts: dict[str, jax.Array], use_time: bool, time_mode: str) -> jax.Array:
    """`[item | category | time]` (concat), `[item | category] + time` (add) or `[item | category]`.

    Parts with fewer leading dims (an unbatched time part `[L, d]`) are broadcast.
    """
    lead = jnp.broadcast_shapes(*(p.shape[:-1] for p in parts.values()))
    parts = {f: jnp.broadcast_to(p, (*lead, p.shape[-1])) for f, p in parts.items()}
    semantic = jnp.concatenate([parts["item"], parts["category"]], axis=-1)
    if not use_time:
        return semantic
    if time_mode == "add":
        return semantic + parts["time"]
    return jnp.concatenate([semantic, parts["time"]], axis=-1)


class Projections(nn.Module):
    """Apply the variant's projections and compose each role's vector (module name `project`).

    Input {role: {field: vector}}; output {role: `[..., D]`, or its parts
    `(item, category[, time])` (search.Behaviours) where the vector is their concatenation
    (concat time mode, no map after concatenation): the search and aggregation then never
    build the `[B, L, D]` concatenation. Roles that name the same projection group share the
    map (its parameters are created once).
    """

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
        submodules: dict[str, nn.Module] = {}
        for role, parts in role_fields.items():
            parts = dict(parts)
            if proj is not None and proj.per_field:
                group = proj.groups[role]
                if group not in submodules:
                    submodules[group] = _FieldMaps(
                        proj.fields,
                        proj.hidden,
                        proj.use_bias,
                        proj.output_dim,
                        self.unused_time_width.get(role, 0),
                        self.init_std,
                        name=group,
                    )
                parts = submodules[group](parts)
            if (proj is None or proj.per_field) and not (self.use_time and self.time_mode == "add"):
                out[role] = tuple(parts[f] for f in ("item", "category", "time") if f in parts)
                continue
            vector = compose(parts, self.use_time, self.time_mode)
            if proj is not None and not proj.per_field:
                group = proj.groups[role]
                if group not in submodules:
                    submodules[group] = ProjectionMLP(
                        vector.shape[-1], (), proj.use_bias, self.init_std, name=group
                    )
                vector = submodules[group](vector)
            out[role] = vector
        return out


class _FieldMaps(nn.Module):
    """One ProjectionMLP per mapped field (`<field>/dense_i`); other fields pass through."""

    fields: tuple[str, ...]
    hidden: tuple[int, ...]
    use_bias: bool
    output_dim: int | None
    unused_time_width: int = 0
    init_std: float = 0.01

    @nn.compact
    def __call__(self, parts: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = dict(parts)
        for field in self.fields:
            if field not in parts:
                # Time without use_time: the official constructor still builds the map (it
                # counts in the L2 penalty), so create it at init and never use it.
                if self.is_initializing() and self.unused_time_width:
                    width = self.output_dim or self.unused_time_width
                    ProjectionMLP(width, self.hidden, self.use_bias, self.init_std, name=field)(
                        jnp.zeros((1, self.unused_time_width))
                    )
                continue
            width = self.output_dim or parts[field].shape[-1]
            out[field] = ProjectionMLP(
                width, self.hidden, self.use_bias, self.init_std, name=field
            )(parts[field])
        return out
