"""Command line: flags -> resolved config -> `train.run`.

    python -m dare_jax.main --config configs/taobao.py
    python -m dare_jax.main --config configs/taobao.py:model=twin,dim=64 --config.optim.lr=0.005
    python -m dare_jax.main --config configs/demo.py

Any config field can be overridden with `--config.<path>=<value>` (`--config.mesh.*` shapes
the device mesh). Several processes (hosts) run the same command, each with
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (or the JAX_* variables
of those names, or `--distributed_auto`). Bad input (config, data, run directory,
checkpoint) ends with a one-paragraph message on stderr and exit code 2, without a
traceback. On a CPU, start it with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for speed.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "config file, optionally with a variant: configs/taobao.py:model=twin",
    lock_config=True,
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for a multi-process run (default: $JAX_COORDINATOR_ADDRESS)",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "processes of a multi-process run (default: $JAX_NUM_PROCESSES)"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "this process's index, 0..num_processes-1 (default: $JAX_PROCESS_ID)"
)
_DISTRIBUTED_AUTO = flags.DEFINE_bool(
    "distributed_auto",
    False,
    "join a multi-process run whose settings JAX detects (SLURM, Open MPI, Kubernetes, TPU)",
)


def _print_summary(results: dict) -> None:
    mean, std, seeds = results["mean"], results["std"], len(results["seeds"])
    print(f"{results['dataset']} {results['variant']}: test over {seeds} seed(s)")
    for name in ("auc", "gauc", "category_auc", "log_loss", "accuracy"):
        print(f"  {name:13s} {mean[name]:.5f} +- {std[name]:.5f}")
    print(f"results: {results['config']['workdir']}/results.json")


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (a message, exit code 2), not a bug."""
    from dare_jax.checkpointing import CheckpointError
    from dare_jax.config import ConfigError
    from dare_jax.data import DatasetError
    from dare_jax.experiment import ExperimentError
    from dare_jax.train import RunError

    return ConfigError, DatasetError, ExperimentError, RunError, CheckpointError, FloatingPointError


def start_process() -> None:
    """Quiet console logging, a huge-pages hint where it would help, then joining any
    multi-process run (before anything touches JAX: the device list becomes global)."""
    from dare_jax import huge_pages

    if hint := huge_pages.hint():
        print(hint, file=sys.stderr)
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO through absl; keep the console to our own lines.
        logging.set_verbosity(logging.WARNING)
    # Imported here so that `--help` and flag errors do not pay for JAX start-up.
    from dare_jax import sharding

    try:
        sharding.initialize_distributed(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            auto=_DISTRIBUTED_AUTO.value,
        )
    except (sharding.ShardingError, ValueError, RuntimeError) as error:
        print(f"error: cannot join the multi-process run: {error}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    start_process()
    from dare_jax import config, sharding, train

    try:
        results = train.run(config.resolve(_CONFIG.value))
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = "interrupted; rerun the same command to resume from the latest checkpoint"
        print(hint, file=sys.stderr)
        sys.exit(130)
    if sharding.is_main_process():
        _print_summary(results)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-file and override errors as one message (exit 2)."""
    try:
        remaining = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.get("workdir")  # config files load lazily: fail here, not later
        return remaining
    except OSError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        print(f"error: cannot load the --config file: {' '.join(lines[-2:])}", file=sys.stderr)
    except flags.Error as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):
            # config_flags embeds the config file's traceback; its last line is the reason.
            print(f"error: {lines[0]}\n  {lines[-1]}", file=sys.stderr)
        else:
            print(f"error: {error}", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        reason = str(error.args[0] if error.args else error).strip("'\"")
        reason = reason.replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        print(f"error: bad --config.* override: {reason}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
