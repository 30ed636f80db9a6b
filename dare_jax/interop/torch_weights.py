"""Import official PyTorch DARE weights (github thuml/DARE `DIN` class) into our variables.

The official `state_dict` names every module by the attribute that holds it; tied modules
(shared tables and maps) appear under every attribute name that points at them, with
identical values. `official_names(spec, path)` lists every official name of one of our
leaves; `import_state_dict` fills a variables template (from `model.init`) from a state
dict, transposing Linear weights (PyTorch `(out, in)` -> our kernel `[in, out]`) and putting
BatchNorm running statistics into `batch_stats`. A state dict comes from an `.npz` or from a
`.pth` file when torch happens to be installed (torch is NOT a dependency of this project).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dare_jax.models.variants import ROLES, VariantSpec

_HEAD_MODULES = {"main": "main_mlp", "aux": "auxiliary_mlp"}
# Our leaf name -> the official parameter or buffer name.
_LEAF_SUFFIX = {"kernel": "weight", "scale": "weight", "slope": "weight", "bias": "bias",
                "mean": "running_mean", "var": "running_var"}


def _official_role(role: str) -> str:
    """'attention_target' -> 'attention_of_target'."""
    kind, who = role.split("_")
    return f"{kind}_of_{who}"


def _sequential_index(layer: str, has_leading_batchnorm: bool) -> int:
    """Index in an official nn.Sequential of our `dense_i` / `prelu_i` / `batch_norm`."""
    if layer == "batch_norm":
        return 0
    kind, index = layer.rsplit("_", 1)  # each dense_i is followed by its prelu_i
    return 2 * int(index) + int(kind == "prelu") + int(has_leading_batchnorm)


def official_module_names(spec: VariantSpec, path: tuple[str, ...]) -> list[str]:
    """Official module (attribute) names of the module holding leaf `path` (tied: several)."""
    root = path[0]
    if root == "embed":
        group, field = path[1], path[2]
        roles = [r for r in ROLES if spec.tables[r] == group]
        return [f"{field}_id_embedding_layer_for_{_official_role(r)}" for r in roles]
    if root == "project":
        proj = spec.projection
        if proj is None:
            raise KeyError(f"parameter {'/'.join(path)} but the variant has no projection")
        roles = [r for r in ROLES if proj.groups[r] == path[1]]  # path[1]: the table group
        if proj.per_field:
            field, layer = path[2], path[3]
            modules = [f"mlp_for_{field}_{_official_role(r)}" for r in roles]
            if proj.hidden:  # nn.Sequential(Linear, PReLU, ..., Linear)
                return [f"{m}.{_sequential_index(layer, False)}" for m in modules]
            return modules  # a bare nn.Linear
        return [f"mlp_for_{_official_role(r)}" for r in roles]
    if root == "head":
        return [f"{_HEAD_MODULES[path[1]]}.{_sequential_index(path[2], True)}"]
    if root == "din_attention":
        return [f"attention_model.main_model.{_sequential_index(path[1], False)}"]
    raise KeyError(f"no official counterpart known for parameter {'/'.join(path)}")


def official_names(spec: VariantSpec, path: tuple[str, ...]) -> list[str]:
    """Every official state_dict name of our leaf `path` (params or batch_stats)."""
    if path[0] == "embed":  # the table itself is the leaf
        return [f"{m}.weight" for m in official_module_names(spec, path)]
    suffix = _LEAF_SUFFIX[path[-1]]
    return [f"{m}.{suffix}" for m in official_module_names(spec, path[:-1])]


def flatten_tree(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten_tree(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def unflatten_tree(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def import_state_dict(
    spec: VariantSpec, variables: Mapping[str, Any], state: Mapping[str, np.ndarray],
    tie_atol: float = 0.0,
) -> tuple[dict[str, Any], list[str]]:
    """Fill `variables` ({'params', 'batch_stats'} template) from an official `state` dict.

    Every leaf of the template must be found; tied names must hold equal values (up to
    `tie_atol`), otherwise the state dict is not from this variant. Returns (new variables as
    nested dicts of numpy float32 arrays, unused official names such as `num_batches_tracked`).
    """
    used: set[str] = set()
    new_variables: dict[str, Any] = {}
    for collection in ("params", "batch_stats"):
        if collection not in variables:
            continue
        items = []
        for path, leaf in flatten_tree(variables[collection]):
            where = f"{collection}/{'/'.join(path)}"
            names = official_names(spec, path)
            present = [n for n in names if n in state]
            if not present:
                raise KeyError(f"{where}: none of the official names {names} is in the state dict")
            first = np.asarray(state[present[0]])
            for other in present[1:]:
                if not np.allclose(np.asarray(state[other]), first, rtol=0, atol=tie_atol):
                    raise ValueError(f"{other} should be tied to {present[0]} in variant "
                                     f"{spec.official_name!r} but holds different values")
            value = first.T if path[-1] == "kernel" else first  # PyTorch Linear: (out, in)
            if value.shape != tuple(np.shape(leaf)):
                raise ValueError(f"{where} from {present[0]}: shape {value.shape} does not fit "
                                 f"{tuple(np.shape(leaf))}")
            items.append((path, value.astype(np.float32)))
            used.update(present)
        new_variables[collection] = unflatten_tree(items)
    return new_variables, sorted(set(state) - used)


def export_state_dict(spec: VariantSpec, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The official `state_dict` of our variables (every tied name filled; Linear weights
    transposed to `(out, in)`; BatchNorm `num_batches_tracked` is not known and left out)."""
    state: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, value in flatten_tree(variables.get(collection, {})):
            value = np.asarray(value)
            state.update(dict.fromkeys(official_names(spec, path),
                                       value.T if path[-1] == "kernel" else value))
    return state


# Where fixtures hold a state_dict: parity (`state/`), training trajectory (`init/`).
NPZ_STATE_PREFIXES = ("state/", "init/")


def state_from_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The state_dict in an `.npz`: its `state/<name>` or `init/<name>` entries (fixtures),
    keyed by `<name>`, or else every entry (a state_dict saved with `np.savez(**sd)`)."""
    with np.load(path, allow_pickle=False) as data:
        for prefix in NPZ_STATE_PREFIXES:
            names = [k for k in data.files if k.startswith(prefix)]
            if names:
                return {k[len(prefix) :]: data[k] for k in names}
        return {k: data[k] for k in data.files if k != "meta_json"}


def state_from_pth(path: str | Path) -> dict[str, np.ndarray]:
    """An official checkpoint `.pth` (a state_dict) as numpy arrays; needs torch installed."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"reading {path} needs PyTorch, which is not a dependency of dare-jax; "
                          "install torch (CPU build is enough) or convert the checkpoint to "
                          ".npz with keys state/<name> on a machine that has it") from err
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise TypeError(f"{path}: expected a state_dict (mapping), got {type(loaded).__name__}")
    return {str(k): v.detach().cpu().numpy() for k, v in loaded.items()}


def load_state(path: str | Path) -> dict[str, np.ndarray]:
    """State dict from `.npz` (fixture layout) or `.pth` (torch)."""
    path = Path(path)
    if path.suffix == ".npz":
        return state_from_npz(path)
    if path.suffix in (".pth", ".pt"):
        return state_from_pth(path)
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r} (want .npz or .pth)")


# Official constructor options that keep their name in ModelSpec, with the official defaults.
_OFFICIAL_DIMS = {"time_embedding_dim": 16, "attention_item_embedding_dim": -1,
                  "attention_category_embedding_dim": -1, "attention_time_embedding_dim": -1}
_OFFICIAL_FLAGS = {"use_cross_feature": False, "use_aux_loss": False, "use_time": True,
                   "soft_search": False, "use_long_seq_average": True, "only_odot": False,
                   "mlp_position_after_concat": False, "observe_attn_repr_grad": False}


def config_from_official_kwargs(kwargs: Mapping[str, Any]) -> tuple[Any, int, int, int]:
    """Our `ModelSpec` from the official `DIN(...)` constructor kwargs.

    Returns (model spec, item_n, cate_n, max_length). Raises ValueError for official
    options this project does not implement (short_seq_split, a long_seq_split other than the
    whole history, batch_size 1 heads without BatchNorm).
    """
    from dare_jax.models import ModelSpec, canonical_name

    def need(key: str) -> Any:
        if key not in kwargs:
            raise ValueError(f"official constructor kwargs lack {key!r}")
        return kwargs[key]

    max_length = int(need("max_length"))
    if kwargs.get("short_seq_split"):
        raise ValueError(f"short_seq_split={kwargs['short_seq_split']!r} is not supported")
    long_split = kwargs.get("long_seq_split")
    if long_split not in (f"0:{max_length}",):
        raise ValueError(f"long_seq_split={long_split!r}: only '0:{max_length}' is supported")
    if int(kwargs.get("batch_size", 2)) == 1:
        raise ValueError("batch_size=1 (official heads without BatchNorm) is not supported")
    name = canonical_name(str(need("model_name")))
    expected_func = "learnable" if name == "din" else "scaled_dot_product"
    if kwargs.get("attn_func", expected_func) != expected_func:
        raise ValueError(f"attn_func={kwargs['attn_func']!r} but {name} uses {expected_func!r}")
    category_dim = int(kwargs.get("category_embedding_dim", 16))
    item_dim = int(kwargs.get("item_embedding_dim", -1))
    spec = ModelSpec(
        name=name,
        category_embedding_dim=category_dim,
        item_embedding_dim=category_dim if item_dim == -1 else item_dim,
        **{key: int(kwargs.get(key, default)) for key, default in _OFFICIAL_DIMS.items()},
        time_mode=str(kwargs.get("use_time_mode", "concat")),
        top_k=int(kwargs.get("top_k", 10)),
        mlp_hidden_layer=tuple(int(h) for h in kwargs.get("mlp_hidden_layer") or [32]),
        **{key: bool(kwargs.get(key, default)) for key, default in _OFFICIAL_FLAGS.items()},
    )
    spec.check_history_length(max_length)
    return spec, int(need("item_n")), int(need("cate_n")), max_length
