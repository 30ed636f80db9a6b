"""Embedding tables, per-role lookups and the optional projections, driven by a VariantSpec.

Tables are leaves `embed/<group>/<field>` of shape `[rows, width]`; projections live under
`project/<group>/<field>/dense_i` (per field) or `project/<group>/dense_0` (after concat).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dare_jax.models.layers import ProjectionMLP, normal_init
from dare_jax.models.variants import ROLES, VariantSpec

RoleFields = dict[str, dict[str, jax.Array]]


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
            if spec.synchronised_copies and group == "attention":
                copy_of = groups["representation"]
            fields = tuple(f for f, _ in self.rows)
            dims = tuple((f, spec.table_dims[group][f]) for f in fields)
            groups[group] = TableGroup(self.rows, dims, self.init_std, name=group)(copy_of)
        return groups


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of `table [N, d]` for integer `ids [...]` -> `[..., d]`; out-of-range ids give NaN."""
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


EMBEDDING_IDS = "embedding_ids"  # collection of the sown lookup ids (row_sparse_embedding_grads)


def row_lookup_name(group: str, field: str, is_target: bool) -> str:
    """Perturbation / sown-ids name of one gather: `<group>:<field>:<target|history>`."""
    return f"{group}:{field}:{'target' if is_target else 'history'}"


def gather_roles(
    spec: VariantSpec,
    tables: dict[str, dict[str, jax.Array]],
    target_ids: dict[str, jax.Array],
    history_ids: dict[str, jax.Array],
    fields: tuple[str, ...],
    target_shape: tuple[int, ...],
    row_grads: nn.Module | None = None,
) -> RoleFields:
    """{role: {field: `[B, d]` (target roles) or `[..., d]` (behaviour roles: the history ids'
    shape, `[B, L]`, or `[L]` for the derived time ids, the same for every example)}}.

    Each (table, ids) pair is gathered once even when several roles share the table. Target
    ids with fewer leading dims than `target_shape` `[B]` (the derived time id) are gathered
    once and broadcast; unbatched history rows stay `[L, d]` (see search.Behaviours), so their
    products are computed once per position and the table's gradient is a scatter of L rows
    instead of B * L.

    row_grads: a module (the model) to expose the tables' gradients as rows instead of dense
    tables (config `row_sparse_embedding_grads`): each gather reads `stop_gradient(table)`, is
    passed through `row_grads.perturb(name)` (collection `perturbations`; grad w.r.t. it =
    the rows' cotangents `[..., d]`) and its ids are sown under the same name in collection
    `embedding_ids`; name = `row_lookup_name(group, field, is_target)`. See dare_jax.optim.
    Only when the `perturbations` collection is passed in (or mutable): otherwise the lookup
    is the plain one and the tables get their dense gradient as usual.
    """
    gathered: dict[tuple[str, str, bool], jax.Array] = {}
    out: RoleFields = {}
    for role in ROLES:
        group, is_target = spec.tables[role], role.endswith("target")
        ids = target_ids if is_target else history_ids
        out[role] = {}
        for field in fields:
            key = (group, field, is_target)
            if key not in gathered:
                name = row_lookup_name(group, field, is_target)
                if row_grads is None or not (
                    row_grads.is_mutable_collection("perturbations")
                    or row_grads.has_variable("perturbations", name)
                ):
                    # Without perturbations passed in, the table keeps its dense gradient,
                    # so a plain jax.grad training step stays correct with the flag on.
                    rows = lookup(tables[group][field], ids[field])
                else:
                    table = jax.lax.stop_gradient(tables[group][field])
                    rows = row_grads.perturb(name, lookup(table, ids[field]))
                    row_grads.sow(EMBEDDING_IDS, name, ids[field])
                if is_target:
                    rows = jnp.broadcast_to(rows, (*target_shape, rows.shape[-1]))
                gathered[key] = rows
            out[role][field] = gathered[key]
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

    Input {role: {field: vector}}; output {role: `[B, D]` or `[B, L, D]`, or its parts
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
