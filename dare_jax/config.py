"""The configuration, resolved once: a `ConfigDict` in, immutable typed specs out.

`resolve(config)` checks every field of an experiment's `ConfigDict` (a config file under
`configs/` with any `--config.<path>=<value>` overrides) and returns an `ExperimentSpec` of
frozen section specs, all that the code below the entry point reads; a field that cannot
work raises `ConfigError` (a ValueError) naming it and its value. The defaults are the
paper's training setup (`default_config()`); a run's `config.json` is `flat(spec)`, and
`resolve(unflatten(flat))` gives the spec back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import ml_collections
from flax import traverse_util

from dare_jax.models.spec import ModelSpec

TABLE_UPDATES = ("dense", "row_sparse", "lazy")
HISTORIES = ("host", "device")
DATA_KINDS = ("taobao", "tmall")


class ConfigError(ValueError):
    """A config field that cannot work; the message names the field and its value."""


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config field {field} = {value!r}: {why}")


def _at_least(spec: Any, section: str, least: int, *names: str) -> None:
    for name in names:
        value = getattr(spec, name)
        _require(value >= least, f"{section}.{name}", value, f"must be >= {least}")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the samples come from and how batches are built from them."""

    name: str = ""  # the dataset's name in run names and results (taobao, tmall, demo)
    kind: str = ""  # the raw log's format: taobao | tmall
    raw_path: str = ""  # the raw log file
    dir: str = ""  # the preprocessed dataset directory
    preprocess_seed: int = 0  # negative-sampling seed of the preprocessing
    max_length: int = 200  # history length L fed to the model
    blind_history: bool = False  # zero every history (the history-blind baseline)
    shuffle: bool = True  # epoch permutations (run seed); False: file order, as the official code
    synthetic_users: int = 0  # > 0: generate a synthetic Taobao-format log first
    synthetic_rows: int = 0  # target row count of that log (0: the generator's default)
    synthetic_seed: int = 0  # the generator's seed
    synthetic_structure: tuple[tuple[str, Any], ...] = ()  # its `LogStructure` fields
    # Where the [B, L] histories are built (same batches): "host" (the input pipeline) or
    # "device" (sequences kept on the devices; only history spans are sent).
    histories: str = "host"
    prefetch_threads: int = 2  # threads preparing (and copying) the next batches
    # Tables of at least this many rows (0: item_n / cate_n), the extra rows never looked up:
    # speed at a larger catalogue's table size (configs/taobao_synthetic.py).
    min_item_rows: int = 0
    min_category_rows: int = 0

    def __post_init__(self):
        items = self.synthetic_structure
        items = items.items() if isinstance(items, Mapping) else items
        structure = tuple(sorted((str(k), _frozen(v)) for k, v in items))
        object.__setattr__(self, "synthetic_structure", structure)
        _require(self.kind in DATA_KINDS, "data.kind", self.kind, f"expected one of {DATA_KINDS}")
        _require(bool(self.dir), "data.dir", self.dir, "where is the preprocessed dataset?")
        histories = self.histories
        _require(histories in HISTORIES, "data.histories", histories, f"one of {HISTORIES}")
        _at_least(self, "data", 1, "max_length")
        _at_least(self, "data", 0, "prefetch_threads", "min_item_rows", "min_category_rows")
        _at_least(self, "data", 0, "synthetic_users", "synthetic_rows", "synthetic_seed")
        from dare_jax.data.synthetic import LogStructure

        try:
            LogStructure(**self.structure).validate()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"config field data.synthetic_structure: {error}") from error

    @property
    def structure(self) -> dict[str, Any]:
        """`synthetic_structure` as keyword arguments of `write_taobao_log`."""
        return dict(self.synthetic_structure)


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """Adam as in the official code (`dare_jax.optim`); the L2 penalty is part of the loss."""

    lr: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8  # PyTorch Adam's default, as in the official code
    weight_decay: float = 1e-6  # L2 penalty on non-bias, non-embedding weights
    # The tables' maths (dare_jax.optim): "row_sparse" (the paper's dense Adam, from the rows'
    # gradients), "dense" (the same from dense gradients) or "lazy" (only looked-up rows move).
    table_updates: str = "row_sparse"

    def __post_init__(self):
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", self.lr, "must be positive")
        kind, expected = self.table_updates, f"expected one of {list(TABLE_UPDATES)}"
        _require(kind in TABLE_UPDATES, "optim.table_updates", kind, expected)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    batch_size: int = 2048
    num_epochs: int = 2
    max_steps: int = -1  # > 0: stop after this many steps
    dispatch_ahead: int = 4  # steps queued on the device before a loss is checked for NaN
    eval_every_steps: int = 150  # validation (and the latest checkpoint) every N steps
    eval_batch_size: int = 2048
    first_seed: int = 0
    num_seeds: int = 5

    def __post_init__(self):
        _at_least(self, "train", 1, "batch_size", "eval_batch_size", "num_epochs")
        _at_least(self, "train", 1, "eval_every_steps", "num_seeds", "dispatch_ahead")
        _at_least(self, "train", 0, "first_seed")
        steps = self.max_steps
        _require(steps == -1 or steps >= 1, "train.max_steps", steps, "-1 (all) or >= 1")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A (data, model) mesh over every device of every process (dare_jax.sharding): the batch
    is split on `data`; parameters matching the `row_sharded` regex (e.g. "embed/.*/item$")
    and their moments by rows on `model`, padded to a multiple of `table_rows_multiple` (of
    `model`) so that one config gives the same numbers on any mesh; the rest is replicated."""

    data: int = -1  # -1: every device not used by `model`
    model: int = 1
    row_sharded: str = ""  # empty: every parameter replicated
    table_rows_multiple: int = 64

    def __post_init__(self):
        _at_least(self, "mesh", 1, "table_rows_multiple")
        for name in ("data", "model"):
            size = getattr(self, name)
            _require(size == -1 or size >= 1, f"mesh.{name}", size, "expected -1 or >= 1")
        _require(self.data != -1 or self.model != -1, "mesh.data", self.data, "both axes are -1")


@dataclasses.dataclass(frozen=True)
class LogSpec:
    every_steps: int = 50  # training loss to metrics.jsonl / TensorBoard
    progress_bar: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        _at_least(self, "log", 1, "every_steps")


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    embeddings: bool = True  # every learned table of the best checkpoint as .npy
    gradients: bool = False  # per-step attention/representation gradients (observing models)
    gradients_every_steps: int = 1

    def __post_init__(self):
        _at_least(self, "export", 1, "gradients_every_steps")


SECTIONS = {
    "data": DataSpec,
    "model": ModelSpec,
    "optim": OptimSpec,
    "train": TrainSpec,
    "mesh": MeshSpec,
    "log": LogSpec,
    "export": ExportSpec,
}


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: every section's spec, the variant name and the run directory."""

    data: DataSpec
    model: ModelSpec = ModelSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    mesh: MeshSpec = MeshSpec()
    log: LogSpec = LogSpec()
    export: ExportSpec = ExportSpec()
    variant: str = "dare"  # the `model=` variant of the config file (run names, results)
    workdir: str = ""  # the run directory

    def __post_init__(self):
        try:
            self.model.check_history_length(self.data.max_length)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        ok = not self.export.gradients or self.model.variant.observes_gradients
        why = "needs model.observe_attn_repr_grad or model.avoid_domination"
        _require(ok, "export.gradients", True, f"{why} (a twin-family model)")

    def replace(self, **sections: Any) -> ExperimentSpec:
        """A copy with whole sections (or `variant`, `workdir`) replaced, checked again."""
        return dataclasses.replace(self, **sections)


def default_config() -> ml_collections.ConfigDict:
    """Every field at its default, as a `ConfigDict` (the start of every config file)."""
    config = ml_collections.ConfigDict()
    config.variant = "dare"
    for name, cls in SECTIONS.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        if name == "data":
            fields["synthetic_structure"] = ml_collections.ConfigDict()
        config[name] = ml_collections.ConfigDict(fields)
    config.workdir = ""
    return config


def resolve(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ExperimentSpec:
    """The `ExperimentSpec` of `config` (a ConfigDict or nested dict with every field);
    ConfigError naming the first missing, unknown or bad field."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    if unknown := sorted(set(tree) - set(SECTIONS) - {"variant", "workdir"}):
        raise ConfigError(f"config has unknown top-level fields {unknown}")
    sections = {name: _section(name, cls, tree.get(name)) for name, cls in SECTIONS.items()}
    variant, workdir = str(tree.get("variant", "")), str(tree.get("workdir", ""))
    return ExperimentSpec(**sections, variant=variant, workdir=workdir)


def _section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config has no {name} section")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if unknown := sorted(set(values) - set(fields)):
        raise ConfigError(f"config section {name} has unknown fields {unknown}")
    if missing := sorted(set(fields) - set(values)):
        raise ConfigError(f"config section {name} lacks the fields {missing}")
    kwargs = {key: _typed(f"{name}.{key}", fields[key].type, values[key]) for key in fields}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _typed(field: str, annotation: str, value: Any) -> Any:
    """`value` as the field's annotated type (JSON gives lists for tuples, ints for floats)."""
    if annotation.startswith("tuple[tuple"):
        _require(isinstance(value, Mapping | tuple | list), field, value, "expected a mapping")
        return value
    if annotation.startswith("tuple"):
        _require(isinstance(value, tuple | list), field, value, "expected a list")
        return tuple(int(v) for v in value)
    kind = {"int": int, "float": float, "bool": bool, "str": str}[annotation]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
    _require(ok, field, value, f"expected {annotation}")
    return kind(value)


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def to_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """The nested config of `spec` (JSON-ready: tuples as lists)."""
    tree: dict[str, Any] = {"variant": spec.variant, "workdir": spec.workdir}
    for name in SECTIONS:
        section = getattr(spec, name)
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.init}
        if name == "data":
            values["synthetic_structure"] = section.structure
        tree[name] = values
    return json.loads(json.dumps(tree))


def flat(spec: ExperimentSpec) -> dict[str, Any]:
    """{'optim.lr': 0.01, ...}: every field by dotted path (a run's `config.json`)."""
    return traverse_util.flatten_dict(to_dict(spec), sep=".")


def unflatten(flat_config: Mapping[str, Any]) -> dict[str, Any]:
    """{'model.top_k': 20} -> {'model': {'top_k': 20}}; an empty structure stays a section."""
    nested = traverse_util.unflatten_dict(dict(flat_config), sep=".")
    nested.setdefault("data", {}).setdefault("synthetic_structure", {})
    return nested
