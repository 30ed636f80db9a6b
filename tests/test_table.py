"""analysis.table: the Table 1 layout from results.json files, checked against numpy, and its
Markdown, LaTeX and CSV outputs parsed back."""

import csv
import json
import math
import re

import numpy as np
import pytest

from analysis import common, table

SEEDS_PER_RUN = {  # (variant, dim) -> seeds
    ("dare", 16): 3,
    ("twin", 16): 3,
    ("dare", 64): 2,
    ("twin", 64): 2,
    ("twin_observe_grad", 16): 1,
}
PROVENANCE = {
    "code": {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True},
    "packages": {"jax": "0.10.2", "flax": "0.12.8"},
    "devices": {"device_kind": "cpu", "device_count": 1, "process_count": 1},
    "dataset": {"manifest_sha256": "ab" * 32, "dir": "/data/x"},
}


def write_results(run_dir, variant, dim, values, dataset="taobao", provenance=PROVENANCE):
    """A results.json as the driver writes it; values: metric -> [S] per-seed test values."""
    seeds = len(next(iter(values.values())))
    run_dir.mkdir(parents=True)
    results = {
        "dataset": dataset,
        "variant": variant,
        "seeds": [
            {"seed": s, "test": {m: values[m][s] for m in values}, "provenance": provenance}
            for s in range(seeds)
        ],
        "provenance": provenance,
        "config": {"data": {"name": dataset}, "model": {"item_embedding_dim": dim}},
    }
    (run_dir / "results.json").write_text(json.dumps(results))


@pytest.fixture
def runs(tmp_path):
    """name -> (run dir, per-seed values): random metrics for five runs."""
    rng = np.random.default_rng(0)
    out = {}
    for (variant, dim), seeds in SEEDS_PER_RUN.items():
        values = {m: rng.uniform(0.3, 0.9, seeds).tolist() for m in table.METRICS}
        name = f"{variant}_d{dim}"
        write_results(tmp_path / "runs" / name, variant, dim, values)
        out[name] = (tmp_path / "runs" / name, values)
    return out


def expected_cells(runs):
    """metric -> {(row label, column label): (mean, std or nan, run name)} by numpy."""
    cells = {}
    for metric in table.METRICS:
        cells[metric] = {}
        for name, (_, values) in runs.items():
            variant, dim = name.rsplit("_d", 1)
            row = table.PAPER_NAMES.get(variant, variant)
            array = np.asarray(values[metric])
            std = np.std(array, ddof=1) if array.size > 1 else math.nan
            cells[metric][(row, f"taobao d={dim}")] = (np.mean(array), std, name)
    return cells


def expected_best(cells, metric):
    """Cells holding the best mean of their column (columns with >= 2 numbers)."""
    best = set()
    columns = {column for _, column in cells}
    for column in columns:
        means = {key: mean for key, (mean, _, _) in cells.items() if key[1] == column}
        if len(means) < 2:
            continue
        pick = min if metric in table.LOWER_IS_BETTER else max
        target = pick(means.values())
        best |= {key for key, mean in means.items() if mean == target}
    return best


def test_cells_match_numpy_and_outputs_parse(runs, tmp_path):
    out = tmp_path / "table"
    result = table.write_table({n: d for n, (d, _) in runs.items()}, out)
    cells = expected_cells(runs)
    assert result["rows"] == ["DARE", "TWIN", "twin_observe_grad"]  # first appearance
    assert result["columns"] == ["taobao d=16", "taobao d=64"]

    # JSON: every cell against numpy, the best flags against an argmax/argmin.
    saved = json.loads((out / "table.json").read_text())
    for metric in table.METRICS:
        best = expected_best(cells[metric], metric)
        for (row, column), (mean, std, name) in cells[metric].items():
            cell = saved["cells"][metric][row][column]
            assert cell["mean"] == pytest.approx(mean, rel=1e-12)
            if math.isnan(std):
                assert cell["std"] is None  # JSON null for a single seed
            else:
                assert cell["std"] == pytest.approx(std, rel=1e-12)
            assert cell["best"] == ((row, column) in best)
            assert cell["run"] == name
    assert "taobao d=64" not in saved["cells"]["auc"]["twin_observe_grad"]

    # CSV: a csv-module round trip gives one line per metric and cell, full precision.
    with open(out / "table.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == len(table.METRICS) * len(runs)
    assert tuple(lines[0]) == table.CSV_FIELDS
    for line in lines:
        mean, std, name = cells[line["metric"]][(line["model"], line["setting"])]
        assert float(line["mean"]) == pytest.approx(mean, rel=1e-15)
        assert (line["std"] == "") if math.isnan(std) else float(line["std"]) == pytest.approx(std)
        assert line["best"] == str(int((line["model"], line["setting"]) in expected_best(
            cells[line["metric"]], line["metric"])))
        assert line["run"] == name and line["run_dir"] == str(runs[name][0])
        assert line["commit"] == PROVENANCE["code"]["commit"] and line["dirty"] == "1"
        assert line["dataset_manifest_sha256"] == "ab" * 32
        assert line["dataset"] == "taobao" and line["setting"].endswith(f"d={line['dim']}")

    # Markdown: every table row has one cell per column; bold exactly on the best cells.
    markdown = (out / "table.md").read_text()
    sections = markdown.split("\n## ")
    assert [s.splitlines()[0] for s in sections[1:]] == [
        table.METRIC_TITLES[m] for m in table.METRICS
    ] + ["Runs"]
    for metric, section in zip(table.METRICS, sections[1:]):
        rows = [line for line in section.splitlines() if line.startswith("|")]
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        assert header == ["model", "taobao d=16", "taobao d=64"]
        assert re.fullmatch(r"(\|---)+\|", rows[1]) and rows[1].count("---") == 3
        for line in rows[2:]:
            fields = [c.strip() for c in line.strip("|").split("|")]
            assert len(fields) == 3
            for column, text in zip(header[1:], fields[1:]):
                key = (fields[0], column)
                if key not in cells[metric]:
                    assert text == ""
                    continue
                mean, std, _ = cells[metric][key]
                plain = f"{mean:.5f}" + ("" if math.isnan(std) else f" ± {std:.5f}")
                bold = key in expected_best(cells[metric], metric)
                assert text == (f"**{plain}**" if bold else plain)
    runs_section = sections[-1]
    for name, (run_dir, _) in runs.items():
        assert f"| {name} |" in runs_section and str(run_dir) in runs_section
    assert "0123456789ab (dirty)" in runs_section and "abababababababab" in runs_section

    # LaTeX: one tabular per metric, the column spec and every row with the right count.
    latex = (out / "table.tex").read_text()
    assert latex.count("{") == latex.count("}")
    tabulars = re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", latex, re.S)
    assert len(tabulars) == len(table.METRICS)
    for (spec, body), metric in zip(tabulars, table.METRICS):
        assert spec == "lcc"
        lines = [line for line in body.strip().splitlines() if line.endswith(r"\\")]
        assert len(lines) == 1 + 3  # header + three models
        for line in lines:
            assert len(re.split(r"(?<!\\)&", line)) == len(spec)
        assert r"twin\_observe\_grad" in body  # escaped
        bold = sum(line.count(r"\textbf{") for line in lines)
        assert bold == len(expected_best(cells[metric], metric))
    assert "% Runs:" in latex and str(runs["dare_d16"][0]) in latex


def test_labels_can_be_overridden_and_cells_must_be_unique(runs, tmp_path):
    paths = {n: d for n, (d, _) in runs.items()}
    result = table.write_table(
        paths,
        tmp_path / "a",
        rows={"twin_observe_grad_d16": "TWIN (observed)"},
        columns={"dare_d64": "wide", "twin_d64": "wide"},
        metrics=["auc"],
    )
    assert result["rows"] == ["DARE", "TWIN", "TWIN (observed)"]
    assert result["columns"] == ["taobao d=16", "wide"]
    assert result["metrics"] == ["auc"]
    with pytest.raises(common.AnalysisError, match="both give model 'DARE' in column"):
        table.write_table(paths, tmp_path / "b", columns={"dare_d64": "taobao d=16"})
    with pytest.raises(common.AnalysisError, match="names no given run"):
        table.write_table(paths, tmp_path / "c", rows={"nope": "X"})
    with pytest.raises(common.AnalysisError, match="metric 'aucc' unknown"):
        table.write_table(paths, tmp_path / "d", metrics=["aucc"])


def test_null_metric_unfinished_run_and_missing_provenance(tmp_path, capsys):
    values = {m: [0.7, 0.8] for m in table.METRICS}
    values["auc"] = [None, 0.8]  # a seed whose AUC was undefined (one class only)
    write_results(tmp_path / "a", "dare", 16, values, provenance=None)
    write_results(tmp_path / "b", "twin", 16, {m: [0.75, 0.76] for m in table.METRICS})
    result = table.write_table({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "out")
    # A NaN mean is never best, and one number alone is not marked as best of anything.
    assert result["cells"]["auc"]["DARE"]["taobao d=16"]["best"] is False
    assert result["cells"]["auc"]["TWIN"]["taobao d=16"]["best"] is False
    assert result["cells"]["gauc"]["DARE"]["taobao d=16"]["best"] is False
    assert result["cells"]["gauc"]["TWIN"]["taobao d=16"]["best"] is True
    markdown = (tmp_path / "out/table.md").read_text()
    assert "| DARE | n/a |" in markdown
    assert "unknown (no provenance in results.json)" in markdown
    assert result["warnings"] == [] and "Warning" not in markdown

    other_data = {**PROVENANCE, "dataset": {"manifest_sha256": "cd" * 32}}
    write_results(tmp_path / "d", "din", 16, values, provenance=other_data)
    mixed = table.write_table({"b": tmp_path / "b", "d": tmp_path / "d"}, tmp_path / "mixed")
    warning = (
        "column 'taobao d=16' mixes datasets (manifest sha256: b abababababab, d cdcdcdcdcdcd)"
    )
    assert mixed["warnings"] == [warning]
    assert f"**Warning**: {warning}" in (tmp_path / "mixed/table.md").read_text()
    assert f"% WARNING: {warning}" in (tmp_path / "mixed/table.tex").read_text()

    (tmp_path / "c/seed_0").mkdir(parents=True)
    (tmp_path / "c/seed_0/result.json").write_text("{}")
    code = common.run_cli(table.main, ["--run", f"C={tmp_path / 'c'}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "has not finished (seeds finished: ['seed_0'])" in err


def test_cli_writes_the_four_files(runs, tmp_path, capsys):
    args = [item for name, (path, _) in runs.items() for item in ("--run", f"{name}={path}")]
    out = tmp_path / "cli"
    assert common.run_cli(table.main, [*args, "--out", str(out), "--metrics", "auc,log_loss"]) == 0
    printed = capsys.readouterr().out
    assert "## test AUC" in printed and "## test log loss" in printed and "GAUC" not in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "table.csv",
        "table.json",
        "table.md",
        "table.tex",
    ]
