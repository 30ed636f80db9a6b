"""Config files: paper defaults, every variant valid, flag overrides, clear errors."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from dare_jax import config as config_lib
from dare_jax.models import ModelSpec

CONFIG_FILES = ("taobao", "tmall", "demo", "taobao_synthetic", "decoupling")
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_docstring_has_command_and_expected_result(name):
    module = importlib.import_module(f"configs.{name}")
    assert f"python -m dare_jax.main --config configs/{name}.py" in module.__doc__
    assert "should give" in module.__doc__


@pytest.mark.parametrize("name", ("taobao", "tmall"))
def test_paper_defaults(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.optim.lr == 0.01 and config.optim.weight_decay == 1e-6
    assert config.train.batch_size == 2048 and config.train.num_epochs == 2
    assert config.train.eval_every_steps == 150 and config.train.num_seeds == 5
    assert config.model.top_k == 20 and config.model.use_aux_loss
    assert config.model.item_embedding_dim == config.model.category_embedding_dim == 16
    assert config.model.name == "dare" and config.data.max_length == 200
    assert config.data.kind == name and config.workdir == f"runs/{name}/dare"
    # The fields are the specs' own, and resolve to them.
    assert set(config.model.keys()) == set(config_lib.default_config().model.keys())
    assert config_lib.resolve(config).model == ModelSpec()


@pytest.mark.parametrize("variant", sorted(base.MODEL_VARIANTS))
def test_every_variant_is_a_valid_model(variant):
    for name in CONFIG_FILES:
        config = importlib.import_module(f"configs.{name}").get_config(f"model={variant}")
        assert config.variant == variant
        spec = config_lib.resolve(config)  # raises on an invalid model
        assert spec.variant == variant and config_lib.flat(spec)["variant"] == variant


def test_variants_set_what_the_paper_varies():
    get = importlib.import_module("configs.taobao").get_config
    assert get("model=din").model.name == "din" and not get("model=din").model.use_time
    assert not get("model=twin_hard").model.soft_search
    assert not get("model=twin_wo_tr").model.use_cross_feature
    assert not get("model=dare_wo_tr").model.use_cross_feature
    assert get("model=twin_4e").model.name == "twin_4e"
    assert get("model=twin_proj").model.name == "projection"
    small = get("model=dare_small_attn").model
    assert small.attention_item_embedding_dim == small.attention_time_embedding_dim == 8
    wide = get("model=twin,dim=64")
    assert wide.model.item_embedding_dim == wide.model.time_embedding_dim == 64
    assert wide.workdir == "runs/taobao/twin_d64"
    attn = get("model=dare,dim=64,attn_dim=16").model
    assert attn.attention_category_embedding_dim == 16 and attn.category_embedding_dim == 64
    observe = get("model=twin_observe_grad")
    assert observe.model.observe_attn_repr_grad and observe.export.gradients
    assert get("model=twin_avoid_domination").model.avoid_domination
    assert get("model=target_only").data.blind_history
    quick = get("seeds=2,steps=30")
    assert quick.train.num_seeds == 2 and quick.train.max_steps == 30


@pytest.mark.parametrize(
    "arg, message",
    [
        ("model=transformer", "unknown variant"),
        ("dim=0", "dim='0': expected a positive integer"),
        ("depth=3", "'depth': unknown key"),
        ("model", "expected key=value"),
    ],
)
def test_bad_variant_arguments(arg, message):
    with pytest.raises(ValueError, match=message):
        importlib.import_module("configs.taobao").get_config(arg)


def test_config_flags_load_variants_and_overrides():
    argv = [
        "prog",
        f"--config={REPO}/configs/tmall.py:model=twin_hard,seeds=1",
        "--config.optim.lr=0.005",
        "--config.model.top_k=10",
        "--config.data.dir=/tmp/elsewhere",
    ]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, "test", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    config = holder.value
    assert config.model.name == "twin" and not config.model.soft_search
    assert config.optim.lr == 0.005 and config.model.top_k == 10
    assert config.train.num_seeds == 1 and config.data.dir == "/tmp/elsewhere"


def _workdir_after_main_flag_parsing(*args: str) -> str:
    """config.workdir after `dare_jax.main`'s own flag parsing of `args` (a fresh process:
    absl registers the override flags once per process)."""
    code = (
        "import sys; from absl import flags; from dare_jax import main; "
        "main.parse_flags(['main', *sys.argv[1:]]); print(flags.FLAGS.config.workdir)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


@pytest.mark.parametrize(
    "args, workdir",
    [
        (["--config=configs/taobao.py"], "runs/taobao/dare"),
        # The default run directory follows the model trained, not only `model=`.
        (["--config=configs/taobao.py", "--config.model.name=twin"], "runs/taobao/twin"),
        (["--config=configs/tmall.py:model=twin_hard,dim=64"], "runs/tmall/twin_hard_d64"),
        (
            ["--config=configs/tmall.py:model=twin_hard,dim=64", "--config.model.name=DARE"],
            "runs/tmall/dare_d64",
        ),
        (["--config=configs/demo.py", "--config.model.name=din", "--config.workdir=elsewhere"],
         "elsewhere"),
    ],
)
def test_default_run_directory_follows_the_model_trained(args, workdir):
    assert _workdir_after_main_flag_parsing(*args) == workdir
