"""Taobao-scale training speed on a synthetic log (no download needed).

Run (DARE, 300 steps, then one evaluation and one checkpoint):

    python -m dare_jax.main --config configs/taobao_synthetic.py
    python -m dare_jax.main --config configs/taobao_synthetic.py:model=twin
    python -m dare_jax.main --config configs/taobao_synthetic.py --config.data.histories=device

The paper's Taobao setup where it costs time (batch 2048, histories of 200, dims 16, top-20,
Adam on every row of tables with Taobao's row counts: item_n 4,068,791, cate_n 9,408) on a
synthetic Taobao-format log of 3,000 users, written and preprocessed on first use into
`data/taobao_synthetic/`. A log whose ids reach 4 M items would take 100 M rows, so the
tables are sized by `data.min_item_rows` / `data.min_category_rows` instead: the extra rows
are never looked up but are updated at every step like every row, while the lookups reach
the log's items. One evaluation (validation, then test of the best checkpoint) at the last
step.

What it should give: not an AUC (a few hundred steps on a small log) but each seed's
`result.json` "timings" (seconds per phase, compile seconds, peak memory), from which
`benchmarks/training_loop.py` reports samples/s of the steps, of the loop with its input
pipeline, and of the whole run with its evaluation and checkpoint (`benchmarks/README.md`).
"""

from configs.base import apply_variant, base_config

TAOBAO_ITEM_N = 4_068_791
TAOBAO_CATE_N = 9_408


def get_config(arg: str | None = None):
    config = base_config()
    config.data.name = "taobao_synthetic"
    config.data.kind = "taobao"
    config.data.raw_path = "data/taobao_synthetic/UserBehavior_synthetic.csv"
    config.data.dir = "data/taobao_synthetic/preprocessed"
    config.data.synthetic_users = 3000
    config.data.min_item_rows = TAOBAO_ITEM_N
    config.data.min_category_rows = TAOBAO_CATE_N
    config.train.num_epochs = 10  # about 63 steps per epoch: room for max_steps
    config.train.max_steps = 300
    config.train.eval_every_steps = 1_000_000  # only the final evaluation
    config.train.num_seeds = 1
    config.export.embeddings = False
    return apply_variant(config, arg)
