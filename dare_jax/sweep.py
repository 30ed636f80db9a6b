"""A grid of variants, trained one after the other.

    python -m dare_jax.sweep --config configs/taobao.py --models dare,twin,din --dims 16,64
    python -m dare_jax.sweep --config configs/demo.py:seeds=3 --models dare,twin \\
        --out runs/sweeps/demo --config.train.max_steps=300

Each point is the variant `model=M,dim=D` of the config file (after any variant the file
argument names, e.g. `:seeds=3`) with the `--config.*` overrides, as `dare_jax.main` builds
it, trained into the run directory `dare_jax.main` would use (`runs/<dataset>/<M>_d<D>`,
`<M>` without --dims) or `DIR/<M>_d<D>` with --out DIR; at the end it prints the
`python -m analysis.table` command over its runs. Run again, a sweep skips the finished runs
(same config, `results.json` written) and resumes the interrupted one; a run directory
holding another config is refused. Every point is resolved before the first run starts.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from dare_jax import config as config_lib
from dare_jax import main as driver  # defines --config (with overrides) and the process flags

_MODELS = flags.DEFINE_list("models", None, "variants to train, e.g. dare,twin,din (model=)")
_DIMS = flags.DEFINE_list(
    "dims", None, "embedding dimensions, e.g. 16,64 (dim=); default: the config's"
)
_OUT = flags.DEFINE_string(
    "out", None, "folder for the run directories and table/ (default: the config's workdirs)"
)


class SweepError(ValueError):
    """A bad grid (models, dims, overrides); the message names the value."""


def variant_args(base_arg: str, models: Sequence[str], dims: Sequence[int] | None) -> list[str]:
    """The config-file arguments of the grid, model-major: 'seeds=3,model=dare,dim=16', ..."""
    if not models:
        raise SweepError("--models is empty: name at least one variant")
    for label, values in (("--models", list(models)), ("--dims", list(dims or []))):
        if repeated := sorted({str(v) for v in values if values.count(v) > 1}):
            raise SweepError(f"{label} repeats {repeated}")
    base_keys = {part.partition("=")[0].strip() for part in base_arg.split(",") if part.strip()}
    for key, given in (("model", True), ("dim", bool(dims))):
        if given and key in base_keys:
            why = f"the sweep sets it from --{key}s"
            raise SweepError(f"the config argument {base_arg!r} already sets {key}=; {why}")
    base = [base_arg] if base_arg else []
    return [
        ",".join(base + [f"model={model}"] + ([f"dim={dim}"] if dim is not None else []))
        for model in models
        for dim in dims or [None]
    ]


def load_config(config_file: str, arg: str, overrides: Mapping[str, Any]) -> ConfigDict:
    """`get_config(arg)` of the config file, locked, with the parsed --config.* overrides
    applied on top: what `python -m dare_jax.main --config FILE:ARG --config.x=y` builds."""
    spec = importlib.util.spec_from_file_location("dare_jax_sweep_config", config_file)
    if spec is None or not Path(config_file).is_file():
        raise SweepError(f"config file not found: {config_file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        config = module.get_config(arg)
    except ValueError as error:  # configs/base.py names the bad variant key or value
        raise SweepError(f"config {config_file}:{arg}: {error}") from error
    config.lock()
    config.update_from_flattened_dict(dict(overrides))
    return config


def sweep_specs(
    config_file_arg: str,
    models: Sequence[str],
    dims: Sequence[int] | None,
    overrides: Mapping[str, Any],
    out: str | Path | None = None,
) -> list[config_lib.ExperimentSpec]:
    """The resolved specs of the grid, each with its own run directory (`workdir`, which
    overrides may therefore not set). config_file_arg: 'configs/x.py[:ARG]'; overrides:
    dotted path -> value (`--config.*` as absl parsed them). SweepError or ConfigError naming
    the bad point."""
    if "workdir" in overrides:
        raise SweepError(
            "--config.workdir would put every run of the sweep in one directory; "
            "use --out DIR (runs go to DIR/<model>_d<dim>)"
        )
    config_file, _, base_arg = config_file_arg.partition(":")
    specs = []
    for arg in variant_args(base_arg, models, dims):
        config = load_config(config_file, arg, overrides)
        if out is not None:
            config.workdir = str(Path(out) / Path(config.workdir).name)
        specs.append(config_lib.resolve(config))
    workdirs = [spec.workdir for spec in specs]
    if len(set(workdirs)) != len(workdirs):
        raise SweepError(f"two points of the grid share a run directory: {workdirs}")
    return specs


def is_finished(spec: config_lib.ExperimentSpec) -> bool:
    """True if the run's results.json exists and the run was made with this spec."""
    from dare_jax import train

    workdir = Path(spec.workdir)
    if not (workdir / "results.json").is_file() or not (workdir / "config.json").is_file():
        return False
    saved = json.loads((workdir / "config.json").read_text())
    return not train.config_differences(saved, config_lib.flat(spec))


def table_command(specs: Sequence[config_lib.ExperimentSpec], out: str | Path | None) -> str:
    """The `python -m analysis.table` command over the runs, writing into --out/table or
    `table/` in the folder above them (their common parent)."""
    parents = {Path(spec.workdir).parent for spec in specs}
    table_dir = Path(out) / "table" if out is not None else Path(sorted(parents)[0]) / "table"
    runs = " ".join(f"--run {shlex.quote(spec.workdir)}" for spec in specs)
    return f"python -m analysis.table {runs} --out {shlex.quote(str(table_dir))}"


def run_sweep(specs: Sequence[config_lib.ExperimentSpec]) -> None:
    """Train every spec not finished yet, in order, resuming an interrupted one."""
    from dare_jax import sharding, train

    for index, spec in enumerate(specs, 1):
        workdir = Path(spec.workdir)
        finished = is_finished(spec)
        state = "finished, skipped" if finished else "starting"
        if not finished and (workdir / "config.json").exists():
            state = "continuing"  # the driver resumes it (or refuses another config)
        if sharding.is_main_process():
            print(f"sweep [{index}/{len(specs)}] {workdir.name} ({workdir}): {state}", flush=True)
        if not finished:
            train.run(spec)


def parse_dims(values: Sequence[str] | None) -> list[int] | None:
    """--dims as positive integers (None when not given)."""
    if not values:
        return None
    for value in values:
        if not value.strip().isdigit() or int(value) < 1:
            raise SweepError(f"--dims {value!r}: expected a positive integer")
    return [int(value) for value in values]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config_flag = flags.FLAGS["config"]  # defined by dare_jax.main
    if config_flag.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/taobao.py")
    if not _MODELS.value:
        raise app.UsageError("--models is required, e.g. --models dare,twin")
    driver.start_process()
    from dare_jax import sharding

    try:
        config_file = config_flags.get_config_filename(config_flag)
        overrides = config_flags.get_override_values(config_flag)
        specs = sweep_specs(config_file, _MODELS.value, parse_dims(_DIMS.value), overrides, _OUT.value)
        run_sweep(specs)
    except (SweepError, *driver.user_errors()) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume the sweep", file=sys.stderr)
        sys.exit(130)
    if sharding.is_main_process():
        print(f"every run finished; their table:\n  {table_command(specs, _OUT.value)}")


if __name__ == "__main__":
    app.run(main, flags_parser=driver.parse_flags)
