"""The training and evaluation loop of one experiment (all its seeds).

Read top to bottom: `run(config)` checks the config, prepares the data
(preprocessing the raw log on first use), refuses a run directory made with a
different config, then trains every seed with `train_seed` and writes
`results.json` (per-seed and mean/std test metrics plus the full config).

Run directory layout (`config.workdir`):

    config.json                 the flattened config the run was started with
    results.json                written when every seed has finished
    seed_<s>/metrics.jsonl      train loss every log.every_steps, val metrics every eval
    seed_<s>/tensorboard/       the same as TensorBoard scalars
    seed_<s>/checkpoints/{latest,best}/<step>/
    seed_<s>/embeddings/*.npy   every learned table of the best checkpoint
    seed_<s>/gradients/step_<n>.npz   (export.gradients) per-path table gradients
    seed_<s>/result.json        the seed's best step, best validation and test metrics

A seed killed at any point and restarted with the same command resumes from
its latest checkpoint (state + data iterator position + best-so-far) and ends
with exactly the metrics of an uninterrupted run.

Devices: the same loop runs on one device, on a mesh of many, and across
processes (`dare_jax.sharding`): the state is created and kept in its
shardings, each process feeds its rows of every batch, evaluation outputs are
gathered on every process for the exact metrics, checkpoints are written by all
processes together (Orbax), and only process 0 writes logs, exports and JSON.
A run may resume on another mesh (`mesh.data`, `mesh.model` are resumable);
its numbers then agree to float tolerance (the reduction order changes).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from dare_jax import checkpointing, metrics, provenance, run_logging, sharding, steps
from dare_jax.phase_timer import PhaseTimer, peak_memory
from dare_jax.data import pipeline
from dare_jax.data.device_histories import DeviceHistories

# Config fields that may change between a run and its resumption: they do not
# change any number the run computes.
RESUMABLE_FIELDS = (
    "workdir",
    "log.progress_bar",
    "mesh.data",
    "mesh.model",
    "data.histories",
    "data.prefetch_threads",
    "train.dispatch_ahead",
)
# Non-resumable fields added after runs were saved without them, with the value that
# gives what those runs computed: an older run resumes when the command keeps it.
FIELDS_ADDED_LATER = {
    "data.min_item_rows": 0,
    "data.min_category_rows": 0,
    "data.shuffle": True,
    "model.init_from": "",
    "optim.table_updates": "dense",
}
METRIC_NAMES = ("auc", "gauc", "category_auc", "log_loss", "accuracy")
DOWNLOADS = {
    "taobao": (
        "UserBehavior.csv",
        "https://tianchi.aliyun.com/dataset/649",
        "python -m preprocessing.taobao --input {raw} --output {dir}",
    ),
    "tmall": (
        "user_log_format1.csv (inside data_format1.zip)",
        "https://tianchi.aliyun.com/dataset/42",
        "python -m preprocessing.tmall --input {raw} --output {dir}",
    ),
}


class RunError(Exception):
    """Bad user input (config, data, run directory): the message says what and where."""


# ----------------------------------------------------------------------------- config


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'optim.lr': 0.01, ...}: every leaf field by dotted path, JSON values."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key in sorted(node):
                visit(f"{prefix}.{key}" if prefix else key, node[key])
        else:
            flat[prefix] = run_logging.to_jsonable(node)

    visit("", config.to_dict())
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two flattened configs (resumable fields ignored;
    a field added after the run was saved counts as its `FIELDS_ADDED_LATER` value)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_FIELDS:
            continue
        before = saved.get(key, FIELDS_ADDED_LATER.get(key, "<absent>"))
        if before != current.get(key, "<absent>"):
            out.append(f"{key}: run has {before!r}, command has {current.get(key, '<absent>')!r}")
    return out


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks that need no data; RunError naming the field."""
    train = config.train
    for field in ("batch_size", "eval_batch_size", "num_epochs", "eval_every_steps", "num_seeds"):
        if int(train[field]) < 1:
            raise RunError(f"config field train.{field} = {train[field]!r}: must be >= 1")
    if int(train.first_seed) < 0:
        raise RunError(f"config field train.first_seed = {train.first_seed!r}: must be >= 0")
    if int(train.max_steps) == 0 or int(train.max_steps) < -1:
        raise RunError(f"config field train.max_steps = {train.max_steps!r}: -1 (all) or >= 1")
    if int(config.log.every_steps) < 1:
        raise RunError(f"config field log.every_steps = {config.log.every_steps!r}: must be >= 1")
    if int(config.data.max_length) < 1:
        raise RunError(f"config field data.max_length = {config.data.max_length!r}: must be >= 1")
    if config.data.histories not in pipeline.HISTORIES:
        raise RunError(
            f"config field data.histories = {config.data.histories!r}: "
            f"expected one of {list(pipeline.HISTORIES)}"
        )
    for field, least in (
        ("data.prefetch_threads", 0),
        ("data.min_item_rows", 0),
        ("data.min_category_rows", 0),
        ("train.dispatch_ahead", 1),
    ):
        section, name = field.split(".")
        if int(config[section][name]) < least:
            raise RunError(f"config field {field} = {config[section][name]!r}: must be >= {least}")
    if config.data.kind not in DOWNLOADS:
        raise RunError(
            f"config field data.kind = {config.data.kind!r}: expected one of {sorted(DOWNLOADS)}"
        )
    if not config.data.dir:
        raise RunError("config field data.dir is empty: where is the preprocessed dataset?")
    if not config.workdir:
        raise RunError("config field workdir is empty")
    from dare_jax.models import canonical_name

    try:
        canonical_name(str(config.model.name))
    except ValueError as error:
        raise RunError(str(error)) from error
    observe = config.model.observe_attn_repr_grad or config.model.avoid_domination
    if config.export.gradients and not observe:
        raise RunError(
            "config field export.gradients = True needs "
            "model.observe_attn_repr_grad = True (a twin-family model)"
        )
    if int(config.export.gradients_every_steps) < 1:
        raise RunError("config field export.gradients_every_steps must be >= 1")
    if not math.isfinite(config.optim.lr) or config.optim.lr <= 0:
        raise RunError(f"config field optim.lr = {config.optim.lr!r}: must be positive")
    try:  # optim.table_updates: a known value, and "lazy" only for models that support it
        steps.uses_row_sparse_updates(config.model, config.optim)
    except ValueError as error:
        raise RunError(str(error)) from error
    multiple = int(config.mesh.table_rows_multiple)
    if multiple < 1:
        raise RunError(f"config field mesh.table_rows_multiple = {multiple!r}: must be >= 1")


# ------------------------------------------------------------------------------- data


def prepare_dataset(config: ml_collections.ConfigDict):
    """Open `data.dir`; preprocess `data.raw_path` (generating it first for synthetic
    configs) when the dataset is not there yet. RunError with download instructions when
    neither exists."""
    from dare_jax.data import DatasetError, open_dataset, preprocess_log

    data_dir, raw_path = Path(config.data.dir), Path(config.data.raw_path)
    if not (data_dir / "manifest.json").exists():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise RunError(
                f"{data_dir} exists but holds no manifest.json: not a dataset "
                "directory (remove it, or point --config.data.dir elsewhere)"
            )
        if int(config.data.synthetic_users) > 0 and not raw_path.exists():
            from dare_jax.data.synthetic import write_taobao_log

            raw_path.parent.mkdir(parents=True, exist_ok=True)
            rows = int(config.data.synthetic_rows) or None
            print(
                f"generating a synthetic Taobao log ({config.data.synthetic_users} users) "
                f"at {raw_path}",
                flush=True,
            )
            structure = config.data.get("synthetic_structure") or {}
            try:
                write_taobao_log(
                    raw_path,
                    int(config.data.synthetic_users),
                    seed=0,
                    target_rows=rows,
                    **dict(structure),
                )
            except (TypeError, ValueError) as error:
                raise RunError(f"config field data.synthetic_structure: {error}") from error
        if not raw_path.is_file():
            name, url, command = DOWNLOADS[config.data.kind]
            raise RunError(
                f"no preprocessed dataset at {data_dir} and no raw log at {raw_path}.\n"
                f"  1. download {name} from {url}\n"
                f"  2. save it as {raw_path} (or pass --config.data.raw_path=...)\n"
                f"  3. run this command again (it preprocesses first), or preprocess now:\n"
                f"     {command.format(raw=raw_path, dir=data_dir)}"
            )
        print(f"preprocessing {raw_path} into {data_dir} (once)", flush=True)
        try:
            preprocess_log(
                config.data.kind, raw_path, data_dir, seed=int(config.data.preprocess_seed)
            )
        except (ValueError, OSError) as error:
            raise RunError(f"preprocessing {raw_path} failed: {error}") from error
    try:
        return open_dataset(data_dir)
    except (DatasetError, OSError, ValueError) as error:
        raise RunError(f"cannot open the dataset {data_dir}: {error}") from error


# ------------------------------------------------------------------------------ model


def table_rows(config: ml_collections.ConfigDict, manifest: dict) -> tuple[int, int]:
    """(item rows, category rows) of the model's tables: the dataset's item_n and
    cate_n, or `data.min_item_rows` / `data.min_category_rows` when larger (rows no id
    reaches, for measuring speed at a larger catalogue's table size), padded up to a
    multiple of `mesh.table_rows_multiple` when some table is row-sharded
    (`mesh.row_sharded` set), so the rows split evenly over `model`."""
    item_n = max(int(manifest["item_n"]), int(config.data.min_item_rows))
    cate_n = max(int(manifest["cate_n"]), int(config.data.min_category_rows))
    if not config.mesh.row_sharded:
        return item_n, cate_n
    multiple = int(config.mesh.table_rows_multiple)
    return sharding.padded_rows(item_n, multiple), sharding.padded_rows(cate_n, multiple)


def build(config: ml_collections.ConfigDict, manifest: dict):
    """(model, optimizer) for this dataset; RunError naming the bad model field."""
    from dare_jax.models import build_model, validate_model_config

    item_n, cate_n = table_rows(config, manifest)
    try:
        validate_model_config(config.model, item_n, cate_n, int(config.data.max_length))
    except ValueError as error:
        raise RunError(str(error)) from error
    model_cfg = steps.training_model_config(config.model, config.optim)
    model = build_model(model_cfg, item_n, cate_n, int(config.data.max_length))
    return model, steps.make_optimizer(config.optim, config.model)


# ------------------------------------------------------------------------- evaluation


def predict(
    eval_step,
    state,
    dataset,
    split: str,
    config: ml_collections.ConfigDict,
    partitioner: sharding.Partitioner | None = None,
    histories: DeviceHistories | None = None,
) -> dict[str, np.ndarray]:
    """Click probability of every sample of `split`, in file order, with its columns:
    {"prob" (float64), "label", "uid", "cid"} `[N]` (the last batch padded and masked).

    Each batch carries `example_mask` (its valid rows), so that BatchNorm's batch statistics
    (`model.eval_batchnorm_uses_batch_stats`) leave out the filler rows of the last batch.
    With a `partitioner`, the eval batch is rounded up to a multiple of the data
    axis (and process count), each process gathers its rows, and the step's
    probabilities, with the label, user and category columns, come back
    replicated: every process gets the same arrays over all samples.
    With `histories` (needs the `partitioner`), the batches' histories are built on
    the devices from spans (`data.histories = "device"`).
    """
    batch_size = min(int(config.train.eval_batch_size), dataset.num_samples(split))
    rows, replicate = None, None
    if partitioner is not None:
        quantum = math.lcm(partitioner.data_size, jax.process_count())
        batch_size = int(math.ceil(batch_size / quantum) * quantum)
        rows = partitioner.local_rows(batch_size)
        replicate = _replicate_fn(partitioner)
    outputs = []
    for batch, valid in pipeline.eval_batches(
        dataset,
        split,
        batch_size=batch_size,
        max_length=int(config.data.max_length),
        blind_history=bool(config.data.blind_history),
        rows=rows,
        histories="host" if histories is None else "device",
    ):
        batch = {**batch, "example_mask": valid if rows is None else valid[rows[0] : rows[1]]}
        columns = {key: batch[key] for key in ("label", "uid", "cid")}
        if partitioner is not None:
            batch = partitioner.shard_batch(batch, batch_size)
            columns = replicate({key: batch[key] for key in columns})
        if histories is not None:
            batch = histories(batch)
        outputs.append((eval_step(state, batch), columns, valid))  # dispatch now, fetch later
    out = {"prob": np.concatenate([np.asarray(p, np.float64)[v] for p, _, v in outputs])}
    for key in ("label", "uid", "cid"):
        out[key] = np.concatenate([np.asarray(c[key])[v] for _, c, v in outputs])
    return out


def evaluate(
    eval_step,
    state,
    dataset,
    split: str,
    config: ml_collections.ConfigDict,
    partitioner: sharding.Partitioner | None = None,
    histories: DeviceHistories | None = None,
) -> dict:
    """Metrics of `state` over every sample of `split` (`predict`'s arrays)."""
    out = predict(eval_step, state, dataset, split, config, partitioner, histories)
    return metrics.ctr_metrics(out["label"], out["prob"], out["uid"], out["cid"])


@functools.lru_cache(maxsize=8)
def _replicate_fn(partitioner: sharding.Partitioner):
    return partitioner.replicate_fn()


# --------------------------------------------------------------------------- exports


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _real_rows(name: str, array: np.ndarray, rows: dict[str, int] | None) -> np.ndarray:
    """`array` without the padding rows a row-sharded item/category table carries."""
    field = name.rsplit(".", 1)[-1]
    if rows and field in rows and array.ndim == 2:
        return array[: rows[field]]
    return array


def export_embeddings(
    params, directory: Path, rows: dict[str, int] | None = None, replicate=None
) -> list[str]:
    """Every embedding table (a 2-D leaf whose path mentions 'embed') as <path>.npy.

    `rows` ({"item": item_n, "category": cate_n}) trims padding rows of
    row-sharded tables; `replicate` (a `Partitioner.replicate_fn()`) gathers
    row-sharded tables onto every process first. Every process must call this
    (the gather is collective); only process 0 writes.
    """
    tables = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path_name(path)
        if "embed" in name.lower() and np.ndim(leaf) == 2:
            tables[name] = leaf
    if replicate is not None:
        tables = replicate(tables)
    if not sharding.is_main_process():
        return list(tables)
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        np.save(directory / f"{name}.npy", _real_rows(name, np.asarray(table), rows))
    return list(tables)


def export_gradients(observed, step: int, directory: Path, rows: dict | None = None) -> None:
    """The observed per-path table gradients of one step as step_<n>.npz (process 0)."""
    if not sharding.is_main_process():
        return
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(observed)[0]:
        name = _path_name(path).replace("/", ".")
        arrays[name] = _real_rows(name, np.asarray(leaf), rows)
    np.savez(directory / f"step_{step:08d}.npz", **arrays)


# ---------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=8)
def _partitioner(mesh_json: str) -> sharding.Partitioner:
    """One Partitioner (mesh) per mesh config, shared by the compiled functions."""
    mesh = json.loads(mesh_json)
    return sharding.Partitioner(mesh["data"], mesh["model"], mesh["row_sharded"])


def _abstract_batch(batch_spec: tuple) -> dict:
    return {key: jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for key, shape, dtype in batch_spec}


@functools.lru_cache(maxsize=4)
def _compiled_functions(
    model_json: str,
    optim_json: str,
    item_n: int,
    cate_n: int,
    max_length: int,
    mesh_json: str,
    batch_spec: tuple,
):
    """(model, optimizer, init_state, train_step, eval_step, from_checkpoint) for one setup.

    `item_n`/`cate_n` are the table row counts (padded when row-sharded),
    `batch_spec` the ((key, shape, dtype), ...) of a global training batch. The
    state's shardings come from its abstract shapes (`jax.eval_shape`), so
    parameters are created directly in their shardings. Memoised so that several
    runs in one process (tests, sweeps, notebooks) with the same model reuse the
    compiled steps instead of compiling them again.
    """
    model_cfg = ml_collections.ConfigDict(json.loads(model_json))
    optim = ml_collections.ConfigDict(json.loads(optim_json))
    from dare_jax.models import build_model

    model = build_model(steps.training_model_config(model_cfg, optim), item_n, cate_n, max_length)
    optimizer = steps.make_optimizer(optim, model_cfg)
    partitioner = _partitioner(mesh_json)
    batch = _abstract_batch(batch_spec)
    shardings = partitioner.state_shardings(steps.abstract_state(model, optimizer, batch))
    placement = (shardings, partitioner.batch_sharding, partitioner.replicated)
    return (
        model,
        optimizer,
        steps.make_init_state(model, optimizer, shardings),
        steps.make_train_step(model, optimizer, model_cfg, float(optim.weight_decay), *placement),
        steps.make_eval_step(model, model_cfg, *placement),
        steps.make_from_checkpoint(model, optimizer, batch, shardings),
    )


class _Trainer:
    """What is built once per run and shared by its seeds (the step compiles once)."""

    def __init__(self, config: ml_collections.ConfigDict, dataset):
        self.config, self.dataset = config, dataset
        build(config, dataset.manifest)  # validates the model config against the data
        self.steps_per_epoch = pipeline.steps_per_epoch(dataset, int(config.train.batch_size))
        mesh_json = json.dumps(
            {key: config.mesh[key] for key in ("data", "model", "row_sharded")}, sort_keys=True
        )
        try:
            self.partitioner = _partitioner(mesh_json)
            self.partitioner.check_batch_size(int(config.train.batch_size))
        except sharding.ShardingError as error:
            raise RunError(str(error)) from error
        self.batch_size = int(config.train.batch_size)
        self.rows = self.partitioner.local_rows(self.batch_size)  # this process's slice
        self.item_n, self.cate_n = table_rows(config, dataset.manifest)
        self.real_rows = {
            "item": int(dataset.manifest["item_n"]),
            "category": int(dataset.manifest["cate_n"]),
        }
        example = self._example_batch()
        batch_spec = tuple(
            (key, tuple(np.shape(value)), np.asarray(value).dtype.str)
            for key, value in sorted(example.items())
        )
        try:
            (
                self.model,
                self.optimizer,
                self.init_state,
                self.train_step,
                self.eval_step,
                self.from_checkpoint,
            ) = _compiled_functions(
                json.dumps(run_logging.to_jsonable(config.model.to_dict()), sort_keys=True),
                json.dumps(run_logging.to_jsonable(config.optim.to_dict()), sort_keys=True),
                self.item_n,
                self.cate_n,
                int(config.data.max_length),
                mesh_json,
                batch_spec,
            )
        except sharding.ShardingError as error:
            raise RunError(str(error)) from error
        total = self.steps_per_epoch * int(config.train.num_epochs)
        if int(config.train.max_steps) > 0:
            total = min(total, int(config.train.max_steps))
        self.total_steps = total
        self.initial_weights = self._load_initial_weights(example)
        self.histories = None
        if config.data.histories == "device":
            try:
                self.histories = DeviceHistories(
                    dataset, int(config.data.max_length), self.partitioner
                )
            except ValueError as error:
                raise RunError(str(error)) from error

    def _example_batch(self) -> dict:
        # The same first training samples on every process: numpy inputs of a jitted
        # function are replicated, so they must agree across processes.
        return self.dataset.gather(
            "train", np.arange(self.batch_size), int(self.config.data.max_length)
        )

    def _init_args(self, seed: int) -> tuple:
        init_rng, step_rng = np.asarray(jax.random.split(jax.random.PRNGKey(seed)))
        return init_rng, self._example_batch(), step_rng

    def _load_initial_weights(self, example: dict) -> dict | None:
        """`model.init_from`'s official weights as our {'params', 'batch_stats'} (numpy),
        checked against the model's shapes now, before anything is trained or written."""
        path = str(self.config.model.init_from)
        if not path:
            return None
        from dare_jax.interop import torch_weights
        from dare_jax.models import resolve_variant

        template = jax.eval_shape(
            lambda batch: self.model.init(jax.random.PRNGKey(0), batch, train=False), example
        )
        try:
            state_dict = torch_weights.load_state(path)
            variables, _unused = torch_weights.import_state_dict(
                resolve_variant(self.config.model), template, state_dict
            )
        except (OSError, ImportError, KeyError, TypeError, ValueError) as error:
            raise RunError(f"config field model.init_from = {path!r}: {error}") from error
        return variables

    def initial_state(self, seed: int) -> dict:
        """The seed's fresh state, created directly in its shardings (jit out_shardings);
        with `model.init_from`, its params and BatchNorm statistics are those weights."""
        state = self.init_state(*self._init_args(seed))
        if self.initial_weights is not None:
            for collection, values in self.initial_weights.items():
                state[collection] = jax.tree.map(_put_like, values, state[collection])
        return state

    def train_iterator(self, seed: int, position: dict | None = None):
        """The seed's checkpointable iterator over this process's rows of every training
        batch (shuffled per epoch, or file order with `data.shuffle` off), from `position`
        (a saved `get_state()`) or the start."""
        config = self.config
        batches = pipeline.train_dataset(
            self.dataset,
            batch_size=self.batch_size,
            seed=seed,
            num_epochs=int(config.train.num_epochs),
            max_length=int(config.data.max_length),
            blind_history=bool(config.data.blind_history),
            rows=self.rows,
            shuffle=bool(config.data.shuffle),
            histories=str(config.data.histories),
        ).map(self.device_batch)
        threads = int(config.data.prefetch_threads)
        return pipeline.train_iterator(batches, position, prefetch=2 * threads, threads=threads)

    def checkpoint_template(self, seed: int) -> dict:
        """Shapes, dtypes and shardings of the state as checkpoints hold it
        (`steps.to_checkpoint`), without computing (or compiling) it."""
        del seed  # the shapes do not depend on it
        optimizer = steps.checkpoint_optimizer(self.optimizer)
        abstract = steps.abstract_state(self.model, optimizer, self._example_batch())
        return self.partitioner.abstract(abstract)

    def restore(self, checkpoints, which: str, template: dict, step: int | None = None):
        """(training state, progress) from a `latest` or `best` checkpoint."""
        saved, progress = checkpoints.restore(which, template, step=step)
        return self.from_checkpoint(saved), progress

    def save(self, checkpoints, which: str, step: int, state: dict, progress: dict) -> None:
        checkpoints.save(which, step, steps.to_checkpoint(state, self.optimizer), progress)

    def shard_batch(self, local_batch: dict) -> dict:
        """This process's rows of a training batch -> the global batch split on `data`."""
        return self.partitioner.shard_batch(local_batch, self.batch_size)

    def device_batch(self, local_batch: dict) -> dict:
        """This process's rows of a pipeline batch -> the model's global batch on the
        devices (histories built there from spans with `data.histories = "device"`).
        Runs in the pipeline's prefetch threads, so the copy to the devices overlaps the
        training steps."""
        batch = self.shard_batch(local_batch)
        return batch if self.histories is None else self.histories(batch)


def train_seed(trainer: _Trainer, seed: int, seed_dir: Path) -> dict:
    """Train one seed to the end (resuming if it has a checkpoint); returns its result."""
    result_path = seed_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    config, dataset = trainer.config, trainer.dataset
    main_process = sharding.is_main_process()
    checkpoints = checkpointing.RunCheckpoints(seed_dir / "checkpoints")
    template = trainer.checkpoint_template(seed)
    progress: dict[str, Any] = {
        "data_iterator": None,
        "best_auc": None,
        "best_step": None,
        "best_val": None,
    }
    timer = PhaseTimer()
    resume_step = checkpoints.step(checkpointing.LATEST)
    # Bests newer than the latest checkpoint (a kill between the two saves) are stale.
    checkpoints.discard_best_after(-1 if resume_step is None else resume_step)
    with timer.phase("init"):
        if resume_step is not None:
            state, progress = trainer.restore(checkpoints, checkpointing.LATEST, template)
            if main_process:
                print(f"seed {seed}: resuming from step {resume_step}", flush=True)
        else:
            state = trainer.initial_state(seed)
        step = int(state["step"])
    first_step = step
    if main_process:
        log = run_logging.MetricsLog(seed_dir / "metrics.jsonl", resume_step)
        board = run_logging.TensorBoard(
            seed_dir / "tensorboard", bool(config.log.tensorboard), resume_step
        )
    else:  # other processes compute the same numbers and write nothing
        log, board = _Silent(), _Silent()
    iterator = trainer.train_iterator(seed, progress["data_iterator"])
    batch_size = int(config.train.batch_size)
    bar = tqdm(
        total=trainer.total_steps * batch_size,
        initial=step * batch_size,
        unit="sample",
        unit_scale=True,
        desc=f"seed {seed}",
        disable=not (config.log.progress_bar and main_process),
        dynamic_ncols=True,
    )
    # (step, loss array) of steps whose loss is not checked yet: each is checked
    # `train.dispatch_ahead` steps late, so the host queues that many steps on the device
    # instead of waiting for each one (a NaN still stops the run naming its step).
    pending: collections.deque = collections.deque()
    ahead = int(config.train.dispatch_ahead)

    def check_pending(keep: int) -> None:
        while len(pending) > keep:
            steps.check_finite(float(pending[0][1]), pending[0][0])
            pending.popleft()

    try:
        while step < trainer.total_steps:
            with timer.phase("input"):
                batch = next(iterator)
            with timer.phase("train_steps"):
                state, out = trainer.train_step(state, batch)
                step += 1
                pending.append((step, out["total"]))
                check_pending(ahead)
            bar.update(batch_size)
            if config.export.gradients and step % int(config.export.gradients_every_steps) == 0:
                with timer.phase("export"):
                    export_gradients(
                        out["observed"], step, seed_dir / "gradients", trainer.real_rows
                    )
            if step % int(config.log.every_steps) == 0:
                losses = {k: float(v) for k, v in out.items() if k != "observed"}
                log.write({"step": step, "split": "train", **losses})
                board.scalars("train", losses, step)
                bar.set_postfix(step=step, loss=f"{losses['total']:.4f}")
            if step % int(config.train.eval_every_steps) == 0 or step == trainer.total_steps:
                with timer.phase("train_steps"):
                    check_pending(0)
                with timer.phase("eval"):
                    val = evaluate(
                        trainer.eval_step,
                        state,
                        dataset,
                        "val",
                        config,
                        trainer.partitioner,
                        trainer.histories,
                    )
                log.write({"step": step, "split": "val", **val})
                board.scalars("val", val, step)
                # A NaN AUC (one class only) never beats a number; kept as None, as in JSON.
                auc = val["auc"] if math.isfinite(val["auc"]) else None
                best = progress["best_auc"]
                improved = progress["best_step"] is None or (
                    auc is not None and (best is None or auc > best)
                )
                if improved:
                    progress.update(best_auc=auc, best_step=step, best_val=val)
                progress["data_iterator"] = iterator.get_state()
                # Order matters for a kill at any point: a new best is saved first, then
                # latest (which records it), and only then is the previous best deleted. A
                # resume from an older latest discards bests newer than it (they are
                # recomputed identically) and still finds the best that latest records.
                saved_progress = run_logging.to_jsonable(progress)
                with timer.phase("checkpoint"):
                    if improved:  # written once, linked as the latest (same state, progress)
                        trainer.save(checkpoints, checkpointing.BEST, step, state, saved_progress)
                        checkpoints.copy(checkpointing.BEST, checkpointing.LATEST, step)
                    else:
                        trainer.save(checkpoints, checkpointing.LATEST, step, state, saved_progress)
                    checkpoints.keep_only(checkpointing.BEST, int(progress["best_step"]))
                best = progress["best_auc"]
                best_text = "nan" if best is None else f"{best:.5f}"
                if main_process:
                    bar.write(
                        f"seed {seed} step {step}: val auc {val['auc']:.5f} "
                        f"(best {best_text} at step {progress['best_step']})"
                    )
    finally:
        bar.close()
    if int(progress["best_step"]) == step:
        # The best checkpoint is the state in memory: reading it back would hold two copies
        # at once (Orbax's restore alone peaks at about twice the state: 23 GB for a 30 M-row
        # DARE), for the same values.
        best_state, best_progress = state, run_logging.to_jsonable(progress)
    else:
        del state  # before the restore allocates the best state
        with timer.phase("checkpoint"):
            best_state, best_progress = trainer.restore(
                checkpoints, checkpointing.BEST, template, step=int(progress["best_step"])
            )
    with timer.phase("eval"):
        test = evaluate(
            trainer.eval_step,
            best_state,
            dataset,
            "test",
            config,
            trainer.partitioner,
            trainer.histories,
        )
    log.write({"step": step, "split": "test", "best_step": best_progress["best_step"], **test})
    board.scalars("test", test, int(best_progress["best_step"]))
    if config.export.embeddings:
        with timer.phase("export"):
            export_embeddings(
                best_state["params"],
                seed_dir / "embeddings",
                trainer.real_rows,
                _replicate_fn(trainer.partitioner),
            )
    log.close()
    board.close()
    with timer.phase("checkpoint"):
        checkpoints.close()  # waits for any checkpoint still being written
    result = {
        "seed": seed,
        "steps": step,
        "best_step": best_progress["best_step"],
        "val": best_progress["best_val"],
        "test": test,
        # This invocation's wall time by phase (a resumed seed: only the resumed part).
        "timings": {
            **timer.summary(),
            "steps_timed": step - first_step,
            "samples_timed": (step - first_step) * batch_size,
            **peak_memory(),
        },
        # Code, libraries, devices and data of the invocation that finished this seed.
        "provenance": provenance.collect(dataset.directory),
    }
    if main_process:
        run_logging.write_json_atomic(result_path, result)
    return result


def _put_like(value: np.ndarray, like: jax.Array) -> jax.Array:
    """`value` as a global array in `like`'s sharding and dtype (each process supplies the
    shards its devices hold)."""
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


class _Silent:
    """Stands in for the metrics log and TensorBoard writer on processes other than 0."""

    def write(self, *args, **kwargs) -> None:
        pass

    def scalars(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def summarize(results: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of each test metric."""
    summary: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for name in METRIC_NAMES:
        values = np.array([r["test"][name] for r in results], dtype=np.float64)
        summary["mean"][name] = float(values.mean())
        summary["std"][name] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary


def run(config: ml_collections.ConfigDict) -> dict:
    """Train and test every seed of `config`; returns (and writes) results.json's content."""
    check_config(config)
    workdir = Path(config.workdir)
    flat = flatten_config(config)
    saved_config = workdir / "config.json"
    if saved_config.exists():
        differences = config_differences(json.loads(saved_config.read_text()), flat)
        if differences:
            raise RunError(
                f"{workdir} holds a run with a different config; refusing to resume into it. "
                "Differences:\n  "
                + "\n  ".join(differences)
                + "\nUse another --config.workdir, or delete the directory to start over."
            )
    timer = PhaseTimer()
    with timer.phase("prepare_data"):
        if jax.process_count() > 1:
            # Process 0 generates/preprocesses the data (once); the others open it after.
            from jax.experimental import multihost_utils

            if sharding.is_main_process():
                prepare_dataset(config)
            multihost_utils.sync_global_devices("dare_jax.prepare_dataset")
        dataset = prepare_dataset(config)
    with timer.phase("setup"):
        trainer = _Trainer(config, dataset)  # validates the model config against the data
    main_process = sharding.is_main_process()
    if main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        if not saved_config.exists():
            run_logging.write_json_atomic(saved_config, flat)
    seeds = [int(config.train.first_seed) + i for i in range(int(config.train.num_seeds))]
    started = time.time()
    results = [train_seed(trainer, seed, workdir / f"seed_{seed}") for seed in seeds]
    out = {
        "dataset": config.data.name,
        "variant": config.variant,
        "seeds": results,
        **summarize(results),
        "std_note": "sample standard deviation over seeds (ddof=1)",
        "gauc_weighting": "per-user AUC weighted by the user's sample count; one-class users "
        "skipped (category_auc likewise per target category)",
        "seconds_this_invocation": round(time.time() - started, 1),
        # Data preparation and setup of this invocation; each seed has its own "timings".
        "timings": timer.summary(),
        # Code, libraries, devices and data of this invocation (dare_jax.provenance).
        "provenance": provenance.collect(dataset.directory),
        "config": config.to_dict(),
    }
    if main_process:
        run_logging.write_json_atomic(workdir / "results.json", out)
    return out
