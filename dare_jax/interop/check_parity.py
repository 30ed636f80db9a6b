"""Compare our model with the official PyTorch implementation on a parity fixture.

    python -m dare_jax.interop.check_parity FIXTURE.npz [FIXTURE.npz ...] [--rtol 1e-4]

For each fixture: build the variant named in `meta_json` from the official constructor kwargs,
load the `state/` weights, run our model on `input/`, compare every `output/` entry (both
BatchNorm modes, losses, L2 penalty, search scores, main-MLP input) and every `grad/` entry
(gradient of loss_total in training mode; tied modules' gradients summed, as PyTorch does).
Prints the largest absolute and relative error (max |ours - ref| / max |ref|) per entry and
exits non-zero if any entry exceeds the tolerance. Everything runs in float32.

Rows whose `topk_margin` (k-th minus (k+1)-th best score) is below --margin may keep another
behaviour at the top-k boundary under float32 rounding; per-row outputs that depend on the
selection are compared with those rows masked (the count is printed). Batch-level entries
(losses, gradients, training-mode BatchNorm) cannot be masked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dare_jax.interop import torch_weights
from dare_jax.models import TwoStageModel, loss_terms
from dare_jax.models.search import PADDING_SCORE

DEFAULT_RTOL = 1e-4
DEFAULT_MARGIN = 1e-4
DEFAULT_ATOL = 1e-9  # gradients only: absolute floor for entries that are mathematically 0
# Entries whose every row depends on which behaviours the top-k kept.
_SELECTION_DEPENDENT_ROWS = ("representation", "prob_train_mode", "prob_eval_mode")
_HARD_SEARCH_NOTE = (
    "hard search: this project scores the time part once (SPEC 3) and keeps padding out "
    "of the k selected; the official hard path scores time twice, so scores and "
    "everything downstream are expected to differ from an official hard-search fixture"
)


@dataclasses.dataclass
class EntryResult:
    """Comparison of one fixture entry."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclasses.dataclass
class FixtureResult:
    """All comparisons for one fixture."""

    path: str
    variant: str
    entries: list[EntryResult]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)


def _compare(
    name: str, ours: Any, ref: Any, rtol: float, rows: np.ndarray | None = None,
    note: str = "", atol: float = 0.0,
) -> EntryResult:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return EntryResult(name, np.inf, np.inf, False, f"shape {ours.shape} vs {ref.shape}")
    if rows is not None:
        ours, ref = ours[rows], ref[rows]
    if ref.size == 0:
        return EntryResult(name, 0.0, 0.0, True, note or "nothing left to compare")
    diff = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
    # atol: the float32 noise floor for entries that are mathematically zero (e.g. the
    # gradient of the DIN score bias, to which the softmax is invariant).
    ok = bool(np.isfinite(diff) and (rel <= rtol or diff <= atol))
    return EntryResult(name, diff, rel, ok, note)


def _fixture_batch(data: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    keys = ("iid", "cid", "tid", "hist_iid", "hist_cid", "hist_tid")
    batch = {key: np.asarray(data[f"input/{key}"]).astype(np.int32) for key in keys}
    batch["mask"] = np.asarray(data["input/mask"]) > 0
    # The official one-hot target: column 0 = click.
    return batch, (np.asarray(data["input/target"])[:, 0] == 1).astype(np.int32)


def check_fixture(
    path: str | Path, rtol: float = DEFAULT_RTOL, margin: float = DEFAULT_MARGIN,
    atol: float = DEFAULT_ATOL,
) -> FixtureResult:
    """Run every comparison for one fixture; raises ValueError/KeyError on unusable input."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    if "meta_json" not in data:
        raise ValueError(f"{path}: no meta_json entry; not a parity fixture")
    meta = json.loads(str(data["meta_json"]))
    cfg, *sizes = torch_weights.config_from_official_kwargs(meta["constructor_kwargs"])
    weight_decay = float(meta.get("weight_decay", 1e-6))
    model = TwoStageModel(cfg, *sizes)  # sizes: item_n, cate_n, max_length
    batch, label = _fixture_batch(data)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, train=False))
    state = {k[len("state/") :]: v for k, v in data.items() if k.startswith("state/")}
    variables, _unused = torch_weights.import_state_dict(cfg.variant, template, state)
    variables = jax.tree.map(jnp.asarray, variables)
    notes = [] if cfg.soft_search else [_HARD_SEARCH_NOTE]

    def train_loss(params):
        with_params = {**variables, "params": params}
        outputs, _ = model.apply(with_params, batch, train=True, mutable=["batch_stats"])
        terms = loss_terms(outputs, label, params, weight_decay)
        return terms["total"], (outputs, terms)

    loss_and_grads = jax.jit(jax.value_and_grad(train_loss, has_aux=True))
    (_, (out_train, terms)), grads = loss_and_grads(variables["params"])
    out_eval = jax.jit(lambda v: model.apply(v, batch, train=False))(variables)
    eval_terms = loss_terms(out_eval, label, variables["params"], weight_decay)

    margin_values = np.asarray(data.get("output/topk_margin", np.full(len(label), np.inf)))
    # Exact ties (margin 0) come from duplicate behaviours and do not change the output.
    ambiguous = (margin_values > 0) & (margin_values < margin)
    if ambiguous.any():
        notes.append(f"{int(ambiguous.sum())} of {len(label)} rows have 0 < topk_margin < "
                     f"{margin:g}; they are masked in {', '.join(_SELECTION_DEPENDENT_ROWS)} "
                     "only if those fail with all rows")

    ours_by_name: dict[str, Any] = {
        "prob_train_mode": out_train["prob"], "prob_eval_mode": out_eval["prob"],
        "loss_ctr_plus_aux": terms["ctr"] + terms["aux"], "aux_loss": terms["aux"],
        "l2_penalty": terms["l2"], "loss_total": terms["total"],
        "loss_eval_mode": eval_terms["ctr"] + eval_terms["aux"],
        "representation": out_train["representation"],
    }
    entries: list[EntryResult] = []
    for key in sorted(k for k in data if k.startswith("output/")):
        name, ref = key[len("output/") :], data[key]
        if name == "topk_margin":
            continue
        if name == "attention_scores":
            ours = np.asarray(out_train["attention_scores"])
            padded = np.asarray(ref) == np.float32(PADDING_SCORE)
            result = _compare(
                name, np.where(padded, 0, ours), np.where(padded, 0, ref), rtol,
                note="masked positions compared for exact -2**32+1",
            )
            result.ok = result.ok and np.array_equal(padded, ours == np.float32(PADDING_SCORE))
        elif name not in ours_by_name:
            result = EntryResult(name, np.nan, np.nan, False, "no counterpart known")
        else:
            result = _compare(name, ours_by_name[name], ref, rtol)
            if not result.ok and name in _SELECTION_DEPENDENT_ROWS and ambiguous.any():
                # Only when the full comparison fails: drop the ambiguous rows and say so.
                result = _compare(
                    name, ours_by_name[name], ref, rtol, ~ambiguous,
                    f"{int(ambiguous.sum())} ambiguous rows masked; all rows: "
                    f"max_rel {result.max_rel:.3e}",
                )
        entries.append(result)

    # Our gradient leaves keyed by every official parameter name they correspond to.
    grads_by_official = torch_weights.export_state_dict(cfg.variant, {"params": grads})
    for key in sorted(k for k in data if k.startswith("grad/")):
        name = key[len("grad/") :]
        entries.append(
            _compare(key, grads_by_official[name], data[key], rtol, atol=atol)
            if name in grads_by_official
            else EntryResult(key, np.nan, np.nan, False, "no parameter of ours maps to it")
        )
    return FixtureResult(str(path), str(meta.get("variant", cfg.name)), entries, notes)


def format_result(result: FixtureResult, rtol: float, atol: float = DEFAULT_ATOL) -> str:
    """Human-readable table of one fixture's comparisons."""
    tolerance = f"max_rel <= {rtol:g} (gradients: or max_abs <= {atol:g})"
    lines = [f"== {result.path} (variant {result.variant}; float32; tolerance {tolerance})"]
    lines += [f"   note: {n}" for n in result.notes]
    width = max(len(e.name) for e in result.entries)
    lines += [
        f"   {'ok  ' if e.ok else 'FAIL'} {e.name:<{width}}  max_abs {e.max_abs:.3e}  "
        f"max_rel {e.max_rel:.3e}" + (f"  ({e.note})" if e.note else "")
        for e in result.entries
    ]
    passed = sum(e.ok for e in result.entries)
    lines.append(f"   -> {'PASS' if result.ok else 'FAIL'}: {passed}/{len(result.entries)} "
                 "entries within tolerance")
    return "\n".join(lines)


def run_checks(
    jobs: Iterable[tuple], check: Callable[..., Any], report: Callable[[Any], str],
    errors: tuple[type[BaseException], ...] = (OSError, KeyError, ValueError),
) -> int:
    """Print `report(check(*job))` for each job (its first item: the fixture); the exit code:
    0 when every result is ok, 1 otherwise, 2 (and stop) when a job raises one of `errors`."""
    all_ok = True
    for job in jobs:
        try:
            result = check(*job)
        except errors as err:
            print(f"== {job[0]}: cannot check: {err}", file=sys.stderr)
            return 2
        print(report(result), flush=True)
        all_ok = all_ok and result.ok
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 when every fixture passes, 1 otherwise, 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixtures", nargs="+", help="parity fixture .npz files")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help="tolerance on max|ours-ref|/max|ref| per entry")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="rows with 0 < topk_margin < this are masked in per-row outputs")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help="gradients: absolute error always accepted (float32 noise floor)")
    args = parser.parse_args(argv)
    jobs = ((f, args.rtol, args.margin, args.atol) for f in args.fixtures)
    return run_checks(jobs, check_fixture, lambda r: format_result(r, args.rtol, args.atol))


if __name__ == "__main__":
    sys.exit(main())
