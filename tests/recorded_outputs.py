"""Outputs, losses and gradients of every model variant and every search on small fixed inputs.

`tests/fixtures/model_outputs.npz` holds what the implementation of commit 3705005 (before the
two model classes became one, issue 14) computed for each case of `CASES`, with parameters
drawn from a numpy generator seeded by each leaf's path (`case_params`, independent of Flax's
initialisation): every training-mode output, the evaluation-mode click probability, the loss
and the gradient of the loss w.r.t. every parameter (leaves of more than SKETCH_ABOVE entries
other than tables, as a fixed random projection `sketch` to keep the file small).
`tests/test_recorded_outputs.py` applies today's model to the same parameters and inputs and
compares.

Regenerate only on purpose (it overwrites the reference; with case names, only those cases
are (re)computed and the others kept):

    python -m tests.recorded_outputs tests/fixtures/model_outputs.npz [CASE ...]
"""

from __future__ import annotations

import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

ITEM_N, CATE_N, LENGTH, BATCH, TOP_K = 40, 5, 12, 6, 4
WEIGHT_DECAY = 1e-3  # large enough that the L2 term shows in the gradients

# case name -> (configs.base variant, model config overrides). Dims are 4 unless overridden.
CASES: dict[str, tuple[str, dict]] = {
    **{
        variant: (variant, {})
        for variant in (
            "dare",
            "twin",
            "din",
            "twin_4e",
            "twin_proj",
            "twin_hard",
            "twin_wo_tr",
            "dare_wo_tr",
            "dare_small_attn",
            "three_embedding",
            "twin_proj_after_concat",
            "projection_two_linear",
            "projection_with_mlp",
            "projection_no_item",
            "projection_only_time",
            "projection_only_category",
            "projection_only_item",
            "projection_large_emb_small_output",
            "twin_observe_grad",
            "twin_avoid_domination",
            "eta",
            "sdim",
            "twin_v2",
            "eta_decoupled",
            "sdim_decoupled",
            "twin_v2_decoupled",
        )
    },
    "twin_average": ("twin", {"use_long_seq_average": True}),
    "dare_odot_average": ("dare", {"use_long_seq_average": True, "only_odot": True}),
    "twin_hard_average": ("twin_hard", {"use_long_seq_average": True}),
    "twin_time_add": ("twin", {"time_mode": "add", "time_embedding_dim": 8}),
    "twin_no_time": ("twin", {"use_time": False}),
    "dare_no_aux": ("dare", {"use_aux_loss": False}),
    "twin_chunked": ("twin", {"search_chunk": 5}),
    "dare_chunked": ("dare", {"search_chunk": 5}),
    "dare_chunked_average": ("dare", {"search_chunk": 5, "use_long_seq_average": True}),
    "twin_bf16": ("twin", {"score_dtype": "bfloat16"}),
    "dare_chunked_bf16": ("dare", {"search_chunk": 5, "score_dtype": "bfloat16"}),
    "eta_chunked": ("eta", {"search_chunk": 5, "hash_bits": 40}),
    "eta_no_aux": ("eta", {"use_aux_loss": False}),
    "eta_average": ("eta_decoupled", {"use_long_seq_average": True}),
    "sdim_chunked": ("sdim", {"search_chunk": 5}),
    "sdim_chunked_decoupled": ("sdim_decoupled", {"search_chunk": 7, "sdim_group_bits": 4}),
    "twin_v2_small_clusters": ("twin_v2", {"cluster_max_size": 2}),
    # One cluster (cluster_max_size >= L): the same clusters under any clustering algorithm.
    "twin_v2_one_cluster": ("twin_v2", {"cluster_max_size": LENGTH}),
    "twin_v2_one_cluster_decoupled": ("twin_v2_decoupled", {"cluster_max_size": LENGTH}),
    "twin_v2_bf16": ("twin_v2", {"score_dtype": "bfloat16", "use_aux_loss": False}),
}


def case_config(name: str):
    """The `ModelSpec` of case `name` (configs/taobao.py's variant, small dims and tables)."""
    from configs.taobao import get_config
    from dare_jax.config import resolve

    variant, overrides = CASES[name]
    model = resolve(get_config(f"model={variant}")).model
    fields = {f"{field}_embedding_dim": 4 for field in ("item", "category", "time")}
    fields["top_k"] = TOP_K
    fields["init_std"] = 0.3  # well-separated scores: the top-k is not decided by rounding
    fields["time_table_size"] = LENGTH + 1
    return model.replace(**{**fields, **overrides})


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Left-padded histories; row 1 has 2 valid behaviours (fewer than k), row 2 none."""
    rng = np.random.default_rng(seed)
    valid = rng.integers(TOP_K, LENGTH + 1, size=BATCH)
    valid[1], valid[2] = 2, 0
    hist_iid = rng.integers(1, ITEM_N, size=(BATCH, LENGTH))
    hist_iid[np.arange(LENGTH)[None, :] < (LENGTH - valid)[:, None]] = 0
    hist_cid = np.where(hist_iid > 0, rng.integers(1, CATE_N, size=(BATCH, LENGTH)), 0)
    return {
        "iid": rng.integers(1, ITEM_N, size=BATCH).astype(np.int32),
        "cid": rng.integers(1, CATE_N, size=BATCH).astype(np.int32),
        "hist_iid": hist_iid.astype(np.int32),
        "hist_cid": hist_cid.astype(np.int32),
        "label": (np.arange(BATCH) % 2).astype(np.int32),
    }


SKETCH_ABOVE = 64  # gradient leaves with more entries (tables excepted): `sketch`es
SKETCH_WIDTH = 8
SKETCH_SUFFIX = "#sketch"  # key suffix of a sketched gradient leaf


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def sketch_matrix(size: int) -> np.ndarray:
    """The fixed `[size, SKETCH_WIDTH]` Gaussian projection of a leaf of `size` entries."""
    return np.random.default_rng(size).normal(size=(size, SKETCH_WIDTH))


def sketch(leaf: np.ndarray) -> np.ndarray:
    """`[SKETCH_WIDTH]` float64 projection of a leaf (any change of the leaf shows in it)."""
    values = np.asarray(leaf, np.float64).reshape(-1)
    return values @ sketch_matrix(values.size)


def is_sketched(key: str, size: int) -> bool:
    """Gradient leaves stored as sketches: every big one but the tables (kept whole, as their
    rows matter)."""
    return size > SKETCH_ABOVE and not key.startswith("embed/")


def case_params(shapes) -> dict:
    """Parameters for a params tree of `shapes`: each leaf from a generator seeded by its path
    (the synchronised attention copy of a table reads its representation table's seed, so
    the copies start equal). Tables Normal(0, 0.3), every other leaf Normal(0, 0.1)."""
    out = {}
    for path, shape in traverse_util.flatten_dict(shapes, sep="/").items():
        seed_path = path.replace("embed/attention/", "embed/representation/")
        seed = zlib.crc32(seed_path.encode())
        std = 0.3 if path.startswith("embed/") else 0.1
        out[path] = np.random.default_rng(seed).normal(0, std, shape.shape).astype(np.float32)
    return traverse_util.unflatten_dict(out, sep="/")


def run_case(name: str, model_cfg=None) -> dict[str, dict[str, np.ndarray]]:
    """{'outputs', 'eval', 'loss', 'grads'} of case `name` (flat dicts of arrays; `grads`
    holds `sketch`es for the big leaves, keys ending in SKETCH_SUFFIX). model_cfg: the case's
    `ModelSpec` (default `case_config(name)`), e.g. with extra fields set."""
    from dare_jax.models import TwoStageModel, loss_terms

    cfg = case_config(name) if model_cfg is None else model_cfg
    batch = make_batch()
    model = TwoStageModel(cfg, ITEM_N, CATE_N, LENGTH)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, train=False))
    params = jax.tree.map(jnp.asarray, case_params(shapes["params"]))
    batch_stats = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes["batch_stats"])

    def loss(p):
        out, _ = model.apply(
            {"params": p, "batch_stats": batch_stats}, batch, train=True, mutable=["batch_stats"]
        )
        return loss_terms(out, jnp.asarray(batch["label"]), p, WEIGHT_DECAY)["total"], out

    (total, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    eval_prob = jax.jit(model.apply)({"params": params, "batch_stats": batch_stats}, batch)["prob"]
    grads = {
        f"{key}{SKETCH_SUFFIX}" if is_sketched(key, leaf.size) else key: (
            sketch(leaf) if is_sketched(key, leaf.size) else leaf
        )
        for key, leaf in flat(grads).items()
    }
    return {
        "outputs": flat(outputs),
        "eval": {"prob": np.asarray(eval_prob)},
        "loss": {"total": np.asarray(total)},
        "grads": grads,
    }


def main(path: str, names: list[str]) -> None:
    """Write every case's arrays (or those of `names`, keeping the file's other cases), packed
    per (case, kind) into one float32 vector plus its index (`key:shape` strings): one zip
    entry per kind instead of one per array."""
    arrays = {}
    if names:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if k.split("|")[0] not in names}
    for name in names or CASES:
        for kind, values in run_case(name).items():
            keys = sorted(values)
            arrays[f"{name}|{kind}"] = np.concatenate(
                [np.asarray(values[k], np.float32).reshape(-1) for k in keys]
            )
            arrays[f"{name}|{kind}|index"] = np.array(
                [f"{k}:{','.join(map(str, np.shape(values[k])))}" for k in keys]
            )
    np.savez_compressed(path, **arrays)
    print(f"{len(names or CASES)} cases -> {path}")


def load(path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{case: {kind: {key: float32 array}}} from a file written by `main`."""
    out: dict = {}
    with np.load(path) as data:
        for entry in data.files:
            if entry.endswith("|index"):
                continue
            name, kind = entry.split("|")
            values, offset = data[entry], 0
            for item in data[f"{entry}|index"]:
                key, dims = str(item).rsplit(":", 1)
                shape = tuple(int(d) for d in dims.split(",") if d)
                size = int(np.prod(shape, dtype=int))
                out.setdefault(name, {}).setdefault(kind, {})[key] = values[
                    offset : offset + size
                ].reshape(shape)
                offset += size
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
