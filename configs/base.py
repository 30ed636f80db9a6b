"""Shared defaults (the paper's training setup) and the experiment variants.

Not run directly: `configs/taobao.py`, `configs/tmall.py` and `configs/demo.py`
start from `base_config()` and apply `apply_variant(config, arg)`, where `arg`
is the text after the colon in `--config configs/taobao.py:model=twin,dim=64`.

Variant keys (comma-separated `key=value`):
  model=NAME    one of MODEL_VARIANTS below (default dare)
  dim=D         item, category and time embedding dims (default 16; the paper also uses 64, 128)
  attn_dim=D    DARE's attention dims (item, category and time) when they should differ
  seeds=N       number of seeds (default 5)
  steps=N       stop after N training steps (quick runs; default: all epochs)
Every other field is overridden with flags, e.g. `--config.optim.lr=0.005`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dare_jax.config import default_config
from dare_jax.models import canonical_name

# name -> (model config overrides, other config overrides). Each row is one paper experiment.
MODEL_VARIANTS: dict[str, tuple[dict, dict]] = {
    # Table 1 models.
    "dare": ({"name": "dare"}, {}),
    "twin": ({"name": "twin"}, {}),
    "din": ({"name": "din", "use_time": False}, {}),
    "twin_4e": ({"name": "twin_4e"}, {}),
    "twin_proj": ({"name": "projection"}, {}),  # TWIN w/ proj: 12 per-field, per-role maps
    "twin_hard": ({"name": "twin", "soft_search": False}, {}),  # SIM-style category search
    "twin_wo_tr": ({"name": "twin", "use_cross_feature": False}, {}),
    # Ablations and the other decoupling attempts of the paper's appendix.
    "dare_wo_tr": ({"name": "dare", "use_cross_feature": False}, {}),
    # DARE with half-width attention tables (the efficiency result); any width: attn_dim=D.
    "dare_small_attn": ({"name": "dare"}, {"_attention_fraction": 0.5}),
    "three_embedding": ({"name": "three_embedding"}, {}),
    "twin_proj_after_concat": ({"name": "projection", "mlp_position_after_concat": True}, {}),
    "projection_two_linear": (
        {"name": "projection_two_linear", "mlp_position_after_concat": True},
        {},
    ),
    "projection_with_mlp": ({"name": "projection_with_mlp"}, {}),
    "projection_no_item": ({"name": "projection_no_item"}, {}),
    "projection_only_time": ({"name": "projection_only_time"}, {}),
    "projection_only_category": ({"name": "projection_only_category"}, {}),
    "projection_only_item": ({"name": "projection_only_item"}, {}),
    "projection_large_emb_small_output": ({"name": "projection_large_emb_small_output"}, {}),
    # Gradient analyses (SPEC 3): TWIN with the shared tables split into synchronised copies.
    "twin_observe_grad": (
        {"name": "twin", "observe_attn_repr_grad": True},
        {"export.gradients": True},
    ),
    "twin_avoid_domination": (
        {"name": "twin", "observe_attn_repr_grad": True, "avoid_domination": True},
        {"export.gradients": True},
    ),
    # The paper's other baselines, from their own papers: the same model with its own search
    # (dare_jax.models.eta / sdim / twin_v2). SDIM has no attention, hence no full-attention
    # aux head. *_decoupled: DARE's two tables (attention tables hash / search / cluster,
    # representation tables are aggregated).
    # Long histories: any model with --config.data.max_length=10000
    # --config.model.time_table_size=10001 --config.model.search_chunk=1000 (chunked
    # history, linear memory; optionally --config.model.score_dtype=bfloat16).
    "eta": ({"name": "eta"}, {}),
    "sdim": ({"name": "sdim", "use_aux_loss": False}, {}),
    "twin_v2": ({"name": "twin_v2"}, {}),
    "eta_decoupled": ({"name": "eta", "decoupled_tables": True}, {}),
    "sdim_decoupled": ({"name": "sdim", "use_aux_loss": False, "decoupled_tables": True}, {}),
    "twin_v2_decoupled": ({"name": "twin_v2", "decoupled_tables": True}, {}),
    # History-blind baseline: DARE whose every history position is padding.
    "target_only": ({"name": "dare"}, {"data.blind_history": True}),
}

VARIANT_KEYS = ("model", "dim", "attn_dim", "seeds", "steps")


def base_config() -> ml_collections.ConfigDict:
    """The paper's training setup on an unnamed dataset (the dataset configs fill `data`).

    Every field and its meaning: `dare_jax.config` (the specs) and `dare_jax.models.spec`
    (the model's options). `apply_variant` makes the default run directory
    runs/<data.name>/<run name>, the run name being the `model=` variant (+ _d<dim>,
    _attn<dim>), or the model's name when --config.model.name overrides the variant's model.
    """
    return default_config()


def parse_variant_arg(arg: str | None) -> dict[str, str]:
    """`"model=twin,dim=64"` -> {"model": "twin", "dim": "64"}; ValueError naming a bad key."""
    parsed: dict[str, str] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"config argument {part!r}: expected key=value")
        if key not in VARIANT_KEYS:
            raise ValueError(f"config argument {key!r}: unknown key; known: {list(VARIANT_KEYS)}")
        parsed[key] = value
    return parsed


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"config argument {key}={value!r}: expected a positive integer")
    return number


def set_path(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set the field named by ``dotted`` (e.g. ``"train.max_steps"``) of ``config`` in place."""
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = value


def apply_variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply the `key=value` variant string to `config` (in place) and return it."""
    parsed = parse_variant_arg(arg)
    variant = parsed.get("model", config.variant)
    if variant not in MODEL_VARIANTS:
        raise ValueError(
            f"config argument model={variant!r}: unknown variant; known: {sorted(MODEL_VARIANTS)}"
        )
    config.variant = variant
    model_overrides, other_overrides = MODEL_VARIANTS[variant]
    if "dim" in parsed:
        dim = _positive_int("dim", parsed["dim"])
        for field in ("item", "category", "time"):
            config.model[f"{field}_embedding_dim"] = dim
    for key, value in model_overrides.items():
        config.model[key] = value
    for key, value in other_overrides.items():
        if key == "_attention_fraction":
            for field in ("item", "category", "time"):
                width = int(config.model[f"{field}_embedding_dim"])
                config.model[f"attention_{field}_embedding_dim"] = max(1, int(width * value))
        else:
            set_path(config, key, value)
    if "attn_dim" in parsed:
        dim = _positive_int("attn_dim", parsed["attn_dim"])
        for field in ("item", "category", "time"):
            config.model[f"attention_{field}_embedding_dim"] = dim
    if "seeds" in parsed:
        config.train.num_seeds = _positive_int("seeds", parsed["seeds"])
    if "steps" in parsed:
        config.train.max_steps = _positive_int("steps", parsed["steps"])
    suffix = "" if "dim" not in parsed else f"_d{parsed['dim']}"
    suffix += "" if "attn_dim" not in parsed else f"_attn{parsed['attn_dim']}"
    variant_model = _canonical(model_overrides["name"])

    def run_name(model_name: str) -> str:
        # The variant names the run while it trains the variant's model; a run whose
        # --config.model.name says otherwise is named after the model it trains.
        model = _canonical(model_name)
        return (variant if model == variant_model else model) + suffix

    # Lazy (ml_collections FieldReferences): overrides of model.name or data.name, applied
    # after this function, still rename the default run directory. `_apply_op` is the
    # FieldReference hook its own arithmetic operators use.
    model_run_name = config.model.get_ref("name")._apply_op(run_name)
    config.workdir = "runs/" + config.data.get_ref("name") + "/" + model_run_name
    return config


def _canonical(model_name: str) -> str:
    """Our name of a model (ours or official); unknown names as they are (the driver then
    refuses them with the list of known ones)."""
    try:
        return canonical_name(model_name)
    except ValueError:
        return model_name
