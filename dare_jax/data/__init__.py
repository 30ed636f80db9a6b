"""Data layer: raw log readers, the SPEC section 2 protocol, the on-disk format.

Public API (used by the training pipeline; keep stable)::

    ds = open_dataset(directory)        # validated manifest + memory-mapped arrays
    ds.manifest                         # dict incl. 'item_n', 'cate_n'
    ds.num_samples(split)               # split in 'train', 'val', 'test'
    ds.gather(split, indices, max_length=200)
        # -> uid, iid, cid, label: int32 [B] (label 1 = click);
        #    hist_iid, hist_cid: int32 [B, max_length], left-padded with 0, [:, -1] most recent
    ds.gather_spans(split, indices)     # the same with each history as a span of the
        #    sequence arrays: hist_start, hist_stop int64 [B] (for histories built on a device)
    load_split(directory, split, max_length=200)   # same dict for the whole split
    preprocess_log(kind, input_path, output_dir, seed=0, overwrite=False) -> Path
"""

from dare_jax.data.preprocess import preprocess_log
from dare_jax.data.storage import Dataset, DatasetError, load_split, open_dataset

__all__ = ["Dataset", "DatasetError", "load_split", "open_dataset", "preprocess_log"]
