"""Every analysis command line: bad input ends with 'error: ...' naming the path or field and
exit code 2 (no traceback); a good run writes its JSON and PNG files."""

import json

import pytest
from analysis_support import tiny_runs

from analysis import (
    attention_accuracy,
    common,
    discriminability,
    efficiency,
    gradients,
    retrieval,
    training_curves,
)

MODULES = {
    "attention_accuracy": attention_accuracy,
    "retrieval": retrieval,
    "discriminability": discriminability,
    "training_curves": training_curves,
    "efficiency": efficiency,
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_missing_run_directory_is_named(name, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    code = common.run_cli(MODULES[name].main, ["--run", f"X={missing}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_run_without_checkpoint_or_seed(tmp_path, capsys):
    run_dir = tmp_path / "half"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"data.dir": str(tmp_path)}))
    code = common.run_cli(retrieval.main, ["--run", f"X={run_dir}", "--out", str(tmp_path)])
    assert code == 2 and "no seed_<s> folder" in capsys.readouterr().err
    code = common.run_cli(gradients.main, ["--run", str(run_dir), "--out", str(tmp_path)])
    assert code == 2 and "seed_" in capsys.readouterr().err


def test_bad_run_argument_and_duplicate_names(tmp_path):
    with pytest.raises(common.AnalysisError, match="given twice"):
        common.parse_named_runs(["A=x", "A=y"])
    with pytest.raises(common.AnalysisError, match="NAME=RUN_DIR"):
        common.parse_named_runs(["=x"])
    assert common.parse_named_runs(["runs/demo/twin"]) == {"twin": common.Path("runs/demo/twin")}


def test_training_curves_cli_on_tiny_runs(tmp_path_factory, tmp_path, capsys):
    runs = tiny_runs(tmp_path_factory.getbasetemp() / "analysis_runs")
    args = [item for name, path in runs.items() for item in ("--run", f"{name}={path}")]
    assert common.run_cli(training_curves.main, [*args, "--out", str(tmp_path)]) == 0
    assert "best val AUC" in capsys.readouterr().out
    assert (tmp_path / "training_curves.png").stat().st_size > 0
