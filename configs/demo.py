"""A few-minute demo on a synthetic Taobao-format log (no download needed).

Run:

    python -m dare_jax.main --config configs/demo.py
    python -m dare_jax.main --config configs/demo.py:model=twin
    python -m dare_jax.main --config configs/demo.py:model=target_only   # history-blind baseline

The first run writes a synthetic `UserBehavior.csv`-format log
(`dare_jax.data.synthetic.write_taobao_log`, 1,500 users) to
`data/demo/UserBehavior_synthetic.csv` and preprocesses it into
`data/demo/preprocessed` (a few seconds). Then one seed trains DARE (d=16,
top-20) with a small setup (batch 256, 1 epoch, histories of 100) and tests
its best-validation checkpoint.

What it should give (measured 2026-11-27 on the shared 2-core machine, load average
1.2-1.8; dare, twin, din and target_only at commit 2e1dc94 (row-sparse Adam, per-part
behaviour vectors), eta, sdim and twin_v2 unchanged since ff862cf (they train with
optax.adam); `--config configs/demo.py:model=M`, seed 0, test AUC of the best-validation
checkpoint, wall time including data check and compilation):

    model=dare         0.8289   (16 s)
    model=twin         0.8228   (12 s)
    model=din          0.8328   (16 s)
    model=eta          0.8290   (19 s)
    model=sdim         0.8068   (15 s)
    model=twin_v2      0.8021   (39 s)
    model=target_only  0.5566   (14 s)   history-blind baseline

so every history-using model beats the history-blind baseline by more than
0.24 AUC. (One seed of this demo does not rank the models: seeds differ by about
0.01. On these synthetic logs DARE has no clear edge over TWIN; that is a property
of the generator and the scale, not the paper's claim.) The first run also
generates the data (a few seconds).
"""

from configs.base import apply_variant, base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.data.name = "demo"
    config.data.kind = "taobao"
    config.data.raw_path = "data/demo/UserBehavior_synthetic.csv"
    config.data.dir = "data/demo/preprocessed"
    config.data.synthetic_users = 1500
    config.data.max_length = 100
    config.model.top_k = 20
    config.train.batch_size = 256
    config.train.eval_batch_size = 1024
    config.train.num_epochs = 1
    config.train.eval_every_steps = 50
    config.train.num_seeds = 1
    config.log.every_steps = 25
    config = apply_variant(config, arg)
    return config
