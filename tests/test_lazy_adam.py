"""dare_jax.optim.LazyAdam (config optim.table_updates="lazy") against a numpy transcription of
its rule, alone and inside the driver's training step; dense Adam where every row is looked up;
memory that does not grow with the table; the config refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dare_jax import checkpointing, optim, sharding, steps, train
from dare_jax.config import ConfigError, OptimSpec
from dare_jax.data import open_dataset, pipeline, preprocess_log
from dare_jax.data.synthetic import write_taobao_log
from dare_jax.models import ModelSpec, TableKey, TwoStageModel, loss_terms
from dare_jax.models.embeddings import EMBEDDING_IDS, PERTURBATIONS
from dare_jax.run_logging import read_jsonl
from crash_support import SimulatedCrash, crashing_train_iterator
from sharding_worker import make_spec
from tiny_setup import random_batch as _batch
from tiny_setup import tiny_overrides

LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-8


def _close(have, want, what, atol=1e-7):
    np.testing.assert_allclose(
        np.asarray(have), np.asarray(want), rtol=2e-6, atol=atol, err_msg=what
    )


class NumpyLazyAdam:
    """The rule of dare_jax/optim.py, row by row in plain numpy (float32)."""

    def __init__(self, params: dict[tuple[str, ...], np.ndarray]):
        """params: {path: array}, tables at ("embed", group, field)."""
        self.p = {k: np.array(v, np.float32) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.k = {k: np.zeros(len(v), np.int64) for k, v in self.p.items() if k[0] == "embed"}
        self.t = 0

    def _adam(self, p, m, v, g, bc1, bc2):
        m = np.float32(1 - B1) * g + np.float32(B1) * m
        v = np.float32(1 - B2) * (g * g) + np.float32(B2) * v
        step = (m / bc1) / (np.sqrt(v / bc2) + np.float32(EPS))
        return p - np.float32(LR) * step, m, v

    def step(self, dense_grads: dict[tuple, np.ndarray], lookups: dict[tuple, list]):
        """lookups: {table path: [(ids, rows), ...]}: every lookup of this batch, duplicates
        kept."""
        self.t += 1
        for key, p in self.p.items():
            if key in self.k:
                summed: dict[int, np.ndarray] = {}
                for ids, rows in lookups.get(key, []):
                    for i, r in zip(np.asarray(ids).tolist(), np.asarray(rows, np.float32)):
                        summed[i] = summed.get(i, np.zeros_like(r)) + r
                for i, g in summed.items():
                    self.k[key][i] += 1
                    k = self.k[key][i]
                    # The row's own count; 1 - b^k exactly (float64), rounded to float32.
                    bc1, bc2 = np.float32(1 - B1**k), np.float32(1 - B2**k)
                    p[i], self.m[key][i], self.v[key][i] = self._adam(
                        p[i], self.m[key][i], self.v[key][i], g, bc1, bc2
                    )
            else:  # the global step's 1 - b^t, exactly (float64), rounded to float32
                g = np.asarray(dense_grads[key], np.float32)
                bc1, bc2 = np.float32(1 - B1**self.t), np.float32(1 - B2**self.t)
                self.p[key], self.m[key], self.v[key] = self._adam(
                    p, self.m[key], self.v[key], g, bc1, bc2
                )


def _params(rng):
    return {
        "embed": {
            "g": {
                "item": jnp.asarray(rng.normal(size=(50, 4)), jnp.float32),  # > its lookups
                "category": jnp.asarray(rng.normal(size=(7, 4)), jnp.float32),  # < its lookups
                "time": jnp.asarray(rng.normal(size=(9, 4)), jnp.float32),  # never looked up
            }
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }


def test_update_follows_the_numpy_rule_with_duplicates_and_untouched_rows():
    rng = np.random.default_rng(0)
    params = _params(rng)
    adam = optim.LazyAdam(LR, B1, B2, EPS)
    state = adam.init(params)
    oracle = NumpyLazyAdam(optim.flatten_params(params))
    update = jax.jit(adam.update)
    item, category, time = (("embed", "g", field) for field in ("item", "category", "time"))
    head_kernel = ("head", "kernel")
    touched: dict[tuple, set] = {item: set(), category: set()}
    for t in range(5):
        item_ids = rng.integers(0, 25, size=30).astype(np.int32)  # rows 25.. never looked up
        item_ids[:3] = item_ids[3]  # a quadruple duplicate
        category_ids = rng.integers(0, 5, size=12).astype(np.int32)  # rows 5, 6 never
        if t == 2:
            item_ids[:] = 1  # one row looked up 30 times
        lookups = {
            # A table's rows come as several lookups (target, history).
            item: [
                (item_ids[:10], rng.normal(size=(10, 4))),
                (item_ids[10:], rng.normal(size=(20, 4))),
            ],
            category: [(category_ids, rng.normal(size=(12, 4)))],
        }
        lookups = {k: [(i, r.astype(np.float32)) for i, r in v] for k, v in lookups.items()}
        for key, pairs in lookups.items():
            touched[key] |= {int(i) for ids, _ in pairs for i in ids}
        head = rng.normal(size=(3, 2)).astype(np.float32)
        oracle.step({head_kernel: head}, lookups)
        rows = {
            optim.table_of(k): [(jnp.asarray(i), jnp.asarray(r)) for i, r in v]
            for k, v in lookups.items()
        }
        params, state = update(params, {head_kernel: jnp.asarray(head)}, rows, state)
        flat = optim.flatten_params(params)
        mu, nu = optim.flatten_params(state.mu), optim.flatten_params(state.nu)
        counts = optim.flatten_params(state.row_count)
        for key in oracle.p:
            _close(flat[key], oracle.p[key], f"step {t} params {key}")
            _close(mu[key], oracle.m[key], f"step {t} mu {key}")
            _close(nu[key], oracle.v[key], f"step {t} nu {key}")
            if key in oracle.k:
                np.testing.assert_array_equal(np.asarray(counts[key]), oracle.k[key], key)
    assert int(state.count) == 5
    # Rows never looked up kept their initial values exactly, with zero moments and counts.
    initial = optim.flatten_params(_params(np.random.default_rng(0)))
    flat = optim.flatten_params(params)
    for key, rows_n in ((item, 50), (category, 7), (time, 9)):
        never = sorted(set(range(rows_n)) - touched.get(key, set()))
        assert never
        np.testing.assert_array_equal(np.asarray(flat[key])[never], np.asarray(initial[key])[never])
        assert not np.any(np.asarray(optim.flatten_params(state.mu)[key])[never])
        assert not np.any(np.asarray(optim.flatten_params(state.row_count)[key])[never])


def test_rows_looked_up_at_every_step_follow_dense_adam():
    """Rows looked up at every step have the global step as their count, and rows never looked
    up have zero gradients, which dense Adam leaves in place: on such lookups the lazy rule is
    `optim.adam` (dense Adam) on the dense gradient, for a table updated whole (6 rows, 10
    lookups) and one updated row by row (40 rows, 25 lookups of rows 0-9)."""
    rng = np.random.default_rng(3)
    params = {
        "embed": {
            "g": {
                "item": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                "time": jnp.asarray(rng.normal(size=(40, 3)), jnp.float32),
            }
        }
    }
    adam = optim.LazyAdam(LR)
    state = adam.init(params)
    reference, ref_state = params, optim.adam(LR).init(params)
    for _ in range(4):
        ids = {
            "item": np.concatenate([np.arange(6), rng.integers(0, 6, size=4)]),
            "time": np.concatenate([rng.permutation(10), rng.integers(0, 10, size=15)]),
        }
        ids = {k: v.astype(np.int32) for k, v in ids.items()}
        rows = {k: rng.normal(size=(len(v), 3)).astype(np.float32) for k, v in ids.items()}
        dense = {k: np.zeros(np.shape(params["embed"]["g"][k]), np.float32) for k in ids}
        for key in ids:
            np.add.at(dense[key], ids[key], rows[key])
        table_rows = {
            TableKey("g", k): [(jnp.asarray(ids[k][:7]), jnp.asarray(rows[k][:7])),
                               (jnp.asarray(ids[k][7:]), jnp.asarray(rows[k][7:]))]
            for k in ids
        }
        params, state = adam.update(params, {}, table_rows, state)
        updates, ref_state = optim.adam(LR).update({"embed": {"g": dense}}, ref_state, reference)
        reference = optax.apply_updates(reference, updates)
        for key in ids:
            _close(params["embed"]["g"][key], reference["embed"]["g"][key], key)
            _close(state.mu["embed"]["g"][key], ref_state[0].mu["embed"]["g"][key], key)
            _close(state.nu["embed"]["g"][key], ref_state[0].nu["embed"]["g"][key], key)


def _optim_spec(table_updates="lazy") -> OptimSpec:
    return OptimSpec(lr=LR, b1=B1, b2=B2, eps=EPS, table_updates=table_updates)


def _looked_up(model, variables, batch) -> dict[tuple, np.ndarray]:
    """{table path: the rows the model's training forward pass reads for `batch`} (the ids its
    lookups sow; padding id 0 included); tables it never reads are absent."""
    _, state = model.apply(
        variables,
        batch,
        train=True,
        mutable=["batch_stats", EMBEDDING_IDS, PERTURBATIONS],
        rngs={"dropout": jax.random.PRNGKey(0)},
    )
    table = {lookup.name: lookup.table for lookup in model.lookups}
    rows: dict[tuple, np.ndarray] = {}
    for name, ids in state[EMBEDDING_IDS].items():
        ids = np.ravel(ids[0] if isinstance(ids, tuple) else ids)
        key = table[name].path
        rows[key] = np.union1d(rows.get(key, ids), ids)
    return rows


# The rows of the target time id (0 for every example) feed BatchNorm as a constant, so their
# true gradient is 0 and both sides see float noise that Adam normalises to steps of order lr
# (see tests/test_optim.py); any wrong update is off by ~lr (0.01). Other rows: rounding of
# the two gradient computations moves a step by up to ~4e-5 (DARE with 8-wide attention
# tables, one element of 6,400 at step 2), far below a wrong update.
STEP_PARAM_ATOL = 1e-4
# Those rows, and non-table leaves with such noise-only gradients (the projections' biases of
# that constant), move by noise-signed steps of up to lr (the non-table leaves' Adam is
# RowSparseAdam's, checked against optax in tests/test_optim.py): within lr / 10 here.
NOISE_PARAM_ATOL = 1e-3


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("dare", {}),  # the other variants (~40 s each) in the slow pass
        pytest.param("twin", {}, marks=pytest.mark.slow),
        pytest.param("din", {"use_time": False}, marks=pytest.mark.slow),
        pytest.param("four_embedding", {}, marks=pytest.mark.slow),
        pytest.param("three_embedding", {}, marks=pytest.mark.slow),
        pytest.param("twin", {"soft_search": False}, marks=pytest.mark.slow),  # hard search
        pytest.param("projection", {"mlp_position_after_concat": True}, marks=pytest.mark.slow),
        pytest.param("projection_with_mlp", {}, marks=pytest.mark.slow),
        pytest.param(
            "dare",
            {f"attention_{f}_embedding_dim": 8 for f in ("item", "category", "time")},
            marks=pytest.mark.slow,
        ),
        # Every search strategy trains lazily (one model class, issue 14).
        pytest.param("eta", {}, marks=pytest.mark.slow),
        pytest.param("sdim", {"use_aux_loss": False}, marks=pytest.mark.slow),
        pytest.param("twin_v2", {}, marks=pytest.mark.slow),
        pytest.param("twin", {"search_chunk": 5}, marks=pytest.mark.slow),
    ],
)
def test_driver_step_follows_the_numpy_rule_on_autodiff_gradients(name, overrides):
    """The driver's lazy step (row gradients, LazyAdam, one jitted program) against the numpy
    rule applied to autodiff's dense gradient of the same loss, rows looked up by the batch.
    The item and time tables have more rows than a batch's lookups (updated row by row), the
    category table fewer (updated whole under a mask)."""
    item_n, cate_n, length, wd = 400, 9, 12, 1e-3
    model = TwoStageModel(ModelSpec(name=name, top_k=4, **overrides), item_n, cate_n, length)
    optimizer = optim.make_optimizer(_optim_spec())
    assert isinstance(optimizer, optim.LazyAdam)
    train_step = steps.make_train_step(model, optimizer, wd)
    rng = np.random.default_rng(1)
    batches = [_batch(rng, 8, length, item_n, cate_n) for _ in range(3)]
    key = jax.random.PRNGKey(0)
    init_state = steps.make_init_state(model, optimizer)
    state = init_state(key, batches[0], key)
    oracle = NumpyLazyAdam(optim.flatten_params(state["params"]))
    batch_stats = state["batch_stats"]

    @jax.jit
    def dense_gradient(params, batch_stats, batch, rng):
        def loss(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, batch, train=True,
                mutable=["batch_stats"], rngs={"dropout": rng},
            )
            terms = loss_terms(outputs, batch["label"], params, wd)
            return terms["total"], (terms["total"], updates["batch_stats"])

        return jax.grad(loss, has_aux=True)(params)

    never = set(range(item_n))
    for step, batch in enumerate(batches):
        rng_step = jax.random.fold_in(state["rng"], step)
        params = optim.unflatten_params({k: jnp.asarray(v) for k, v in oracle.p.items()})
        variables = {"params": params, "batch_stats": batch_stats}
        looked_up = _looked_up(model, variables, batch)
        grads, (want_loss, batch_stats) = dense_gradient(params, batch_stats, batch, rng_step)
        grads = optim.flatten_params(grads)
        lookups = {t: [(rows, np.asarray(grads[t])[rows])] for t, rows in looked_up.items()}
        oracle.step(grads, lookups)
        item_table = sorted(t for t in looked_up if t[-1] == "item")[0]
        never -= set(looked_up[item_table].tolist())
        state, metrics = train_step(state, batch)
        _close(metrics["total"], want_loss, f"{name} step {step} loss", atol=1e-6)
        flat = optim.flatten_params(state["params"])
        counts = optim.flatten_params(state["opt_state"].row_count)
        assert sorted(counts) == sorted(oracle.k)
        for table, count in counts.items():
            np.testing.assert_array_equal(np.asarray(count), oracle.k[table], f"{name} {table}")
        for leaf, want in oracle.p.items():
            what = f"{name} step {step} {leaf}"
            if optim.table_of(leaf) is None:
                _close(flat[leaf], want, what, NOISE_PARAM_ATOL)
            elif leaf[-1] == "time":  # row 0: the target's constant time id
                _close(flat[leaf][1:], want[1:], what, STEP_PARAM_ATOL)
                _close(flat[leaf][0], want[0], what, NOISE_PARAM_ATOL)
            else:
                _close(flat[leaf], want, what, STEP_PARAM_ATOL)
    assert train_step._cache_size() == 1
    # Rows no batch looked up did not move.
    initial = init_state(key, batches[0], key)["params"]
    never = sorted(never)
    assert never
    np.testing.assert_array_equal(
        np.asarray(flat[item_table])[never],
        np.asarray(optim.flatten_params(initial)[item_table])[never],
    )


# ----------------------------------------------------------------- config, memory, driver


@pytest.mark.parametrize(
    "optim_overrides,message",
    [
        # The removed switch (now table_updates="dense") is refused, not ignored.
        ({"sparse_table_updates": False}, "unknown fields \\['sparse_table_updates'\\]"),
        (
            {"table_updates": "sparse"},
            "optim.table_updates.*expected one of \\['dense', 'row_sparse', 'lazy'\\]",
        ),
    ],
)
def test_lazy_refusals_name_the_field(optim_overrides, message):
    if "sparse_table_updates" not in optim_overrides:
        with pytest.raises(ValueError, match=message):
            OptimSpec(**optim_overrides)
    overrides = {"optim.table_updates": "lazy"}
    overrides.update({f"optim.{k}": v for k, v in optim_overrides.items()})
    with pytest.raises(ConfigError, match=message):
        make_spec(overrides, "model=dare")


def test_row_sparse_stays_the_default():
    """The paper's dense Adam from the looked-up rows (formerly "dense")."""
    spec = make_spec({}, "model=dare")
    assert spec.optim.table_updates == "row_sparse"
    assert isinstance(optim.make_optimizer(spec.optim), optim.RowSparseAdam)


def _compiled_lazy_step(item_n: int):
    model = TwoStageModel(ModelSpec(name="twin", top_k=4), item_n, 9, 12)
    optimizer = optim.make_optimizer(_optim_spec())
    batch = _batch(np.random.default_rng(0), 16, 12, item_n, 9)
    abstract = steps.abstract_state(model, optimizer, batch)
    step = steps.make_train_step(model, optimizer, 1e-6)
    return abstract, step.lower(abstract, batch).compile()


def test_step_memory_follows_the_lookups_not_the_table():
    """The compiled lazy step's temporaries are the same for a 20,000- and a 200,000-row item
    table (only the looked-up rows are read and written), and its state holds the tables, their
    moments and counts, nothing else of a table's size."""
    temps = {}
    for item_n in (20_000, 200_000):
        abstract, compiled = _compiled_lazy_step(item_n)
        temps[item_n] = compiled.memory_analysis().temp_size_in_bytes
        assert set(abstract) == {"step", "rng", "params", "batch_stats", "opt_state"}
        flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
        big = sorted(jax.tree_util.keystr(p) for p, leaf in flat if leaf.shape[:1] == (item_n,))
        assert len(big) == 4  # the item table's params, mu, nu and row counts
        assert all("item" in path for path in big)
    # A dense item-table-sized temporary would be 200,000 x 16 x 4 bytes = 12.8 MB.
    assert temps[200_000] == temps[20_000], temps


def test_row_sharding_rule_splits_the_lazy_state():
    """With `mesh.row_sharded`, the lazy moments and per-row counts of a table follow its rows."""
    model = TwoStageModel(ModelSpec(name="dare", top_k=4), 128, 64, 12)
    optimizer = optim.make_optimizer(_optim_spec())
    batch = _batch(np.random.default_rng(0), 4, 12, 128, 64)
    abstract = steps.abstract_state(model, optimizer, batch)
    partitioner = sharding.Partitioner(-1, 1, "embed/.*/(item|category)$")
    shardings = partitioner.state_shardings(abstract)
    split = {
        jax.tree_util.keystr(path)
        for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
        if s.spec == jax.sharding.PartitionSpec("model")
    }
    expected = {
        f"{prefix}['embed']['{group}']['{field}']"
        for prefix in ("['params']", *(f"['opt_state'].{s}" for s in ("mu", "nu", "row_count")))
        for group in ("attention", "representation")
        for field in ("item", "category")
    }
    assert split == expected


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy_data")
    write_taobao_log(root / "log.csv", 200, seed=0)
    preprocess_log("taobao", root / "log.csv", root / "pre", progress=False)
    return root / "pre"


@pytest.mark.slow
def test_killed_lazy_run_resumes_bit_identically(tiny_data, tmp_path, monkeypatch):
    """A lazy run killed after step 6 (latest checkpoint: step 4, per-row counts included)
    resumes to the uninterrupted run's losses, metrics and tables, bit for bit; the analyses
    load its checkpoints."""
    lazy = {"optim.table_updates": "lazy", "log.every_steps": 1}
    straight = tmp_path / "straight"
    train.run(make_spec(tiny_overrides(tiny_data, straight, **lazy), "model=dare"))
    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_iterator", crashing_train_iterator(6))
        with pytest.raises(SimulatedCrash):
            train.run(make_spec(tiny_overrides(tiny_data, killed, **lazy), "model=dare"))
    assert checkpointing.RunCheckpoints(killed / "seed_0/checkpoints").newest()[1] == 4
    train.run(make_spec(tiny_overrides(tiny_data, killed, **lazy), "model=dare"))
    log = "seed_0/metrics.jsonl"
    assert read_jsonl(killed / log) == read_jsonl(straight / log)
    for table in sorted((straight / "seed_0/embeddings").iterdir()):
        np.testing.assert_array_equal(
            np.load(killed / "seed_0/embeddings" / table.name), np.load(table)
        )
    from analysis.common import load_run

    loaded = load_run(killed, which="latest")
    counts = optim.flatten_params(loaded.state["opt_state"].row_count)
    # Each item row's count is the number of the 10 training batches that looked it up.
    spec = make_spec(tiny_overrides(tiny_data, killed, **lazy), "model=dare")
    batches = pipeline.train_dataset(
        open_dataset(tiny_data),
        batch_size=spec.train.batch_size,
        seed=0,
        num_epochs=spec.train.num_epochs,
        max_length=spec.data.max_length,
    )
    expected = np.zeros(counts[("embed", "representation", "item")].shape, np.int64)
    for index in range(10):
        batch = batches[index]
        expected[np.unique(np.concatenate([batch["iid"], batch["hist_iid"].ravel()]))] += 1
    assert expected.max() > 1 and (expected == 0).any()
    for table in (("embed", "representation", "item"), ("embed", "attention", "item")):
        np.testing.assert_array_equal(np.asarray(counts[table]), expected, str(table))
