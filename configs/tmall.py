"""Tmall (Tianchi dataset 42, `user_log_format1.csv`): the paper's Tmall experiments.

Run (DARE, 5 seeds, 2 epochs, batch 2048):

    python -m dare_jax.main --config configs/tmall.py
    python -m dare_jax.main --config configs/tmall.py:model=twin

Data: download the "data_format1" archive of https://tianchi.aliyun.com/dataset/42
and put `user_log_format1.csv` into `data/tmall/user_log_format1.csv` (or point
`--config.data.raw_path` at it). The first run preprocesses it into
`data/tmall/preprocessed` (once). To preprocess beforehand instead:

    python -m preprocessing.tmall --input data/tmall/user_log_format1.csv \\
        --output data/tmall/preprocessed

What it should give: the paper's Table 1 reports, as the mean test AUC of 5
seeds at d=16, DARE 0.96800, TWIN 0.95812, DIN 0.95894, TWIN-4E 0.96124,
TWIN (hard) 0.96026, TWIN (w/ proj.) 0.96152, TWIN (w/o TR) 0.96170. These are
the paper's figures; this code has not been run on the full Tmall file here
(only on the ~90-user real sample, see tests/test_train_real.py).
Variants: see `configs/base.py` (MODEL_VARIANTS).
"""

from configs.base import apply_variant, base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.data.name = "tmall"
    config.data.kind = "tmall"
    config.data.raw_path = "data/tmall/user_log_format1.csv"
    config.data.dir = "data/tmall/preprocessed"
    return apply_variant(config, arg)
