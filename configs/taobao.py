"""Taobao (Tianchi dataset 649, `UserBehavior.csv`): the paper's Taobao experiments.

Run (DARE, 5 seeds, 2 epochs, batch 2048):

    python -m dare_jax.main --config configs/taobao.py
    python -m dare_jax.main --config configs/taobao.py:model=twin,dim=64
    python -m dare_jax.main --config configs/taobao.py:model=dare --config.optim.lr=0.005

Data: download `UserBehavior.csv` from https://tianchi.aliyun.com/dataset/649
into `data/taobao/UserBehavior.csv` (or point `--config.data.raw_path` at it).
The first run preprocesses it into
`data/taobao/preprocessed` (once). To preprocess beforehand instead:

    python -m preprocessing.taobao --input data/taobao/UserBehavior.csv \\
        --output data/taobao/preprocessed

What it should give: the paper's Table 1 reports, as the mean test AUC of 5
seeds at d=16, DARE 0.92568, TWIN 0.91688, DIN 0.90442, TWIN-4E 0.90414,
TWIN (hard) 0.91002, TWIN (w/ proj.) 0.89642, TWIN (w/o TR) 0.90732. These are
the paper's figures; this code has not been run on the full Taobao file here
(only on the ~80-user real sample, see tests/test_train_real.py).
Variants: see `configs/base.py` (MODEL_VARIANTS).
"""

from configs.base import apply_variant, base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.data.name = "taobao"
    config.data.kind = "taobao"
    config.data.raw_path = "data/taobao/UserBehavior.csv"
    config.data.dir = "data/taobao/preprocessed"
    return apply_variant(config, arg)
