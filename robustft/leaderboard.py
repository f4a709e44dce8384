"""A resumable side-by-side leaderboard: run every method's recipe, then tabulate their reports.

Why a runner and not a shell script: a full offline leaderboard takes hours on a CPU, and a crash, a
Ctrl-C or a new method must never redo finished work. Each *cell* (one row: a method with its recipe)
is a list of ``python -m robustft`` steps (``fit``, ``average``, ``evaluate``...), or ``python <script>``
steps that prepare data. A step that finished
leaves a marker holding the exact command it ran; a rerun skips it when the command is unchanged, and a
``fit`` that was interrupted resumes from its ``last.ckpt``. Changing a cell's command redoes that step
and the steps after it, nothing else.

Comparability is checked, not assumed: every cell's final ``evaluate`` reads the same test sets (the
cells file's ``eval_sets`` config is appended to each ``evaluate`` step, after the method's own config,
so it wins), and the table refuses reports whose ID / OOD sets or sample counts differ.

Cells file (YAML)::

    eval_sets: experiments/leaderboard/eval_sets.yaml   # data.init_args.{test, ood} shared by all rows
    cells:
      ce_resnet20:
        label: CE fine-tuning (ResNet-20)
        minutes: 6                       # expected wall time, for the ETA only
        default_score: energy            # optional; else the report's meta.default_score
        needs: []                        # cells whose outputs this one reads (run first)
        steps:
          - fit --config configs/quickstart.yaml --trainer.logger.init_args.save_dir {out}
          - evaluate --config configs/quickstart.yaml --ckpt_path {out}/tb/checkpoints/last.ckpt

``{out}`` is the cell's folder, ``{root}`` the leaderboard's output folder (to read another cell's
files), ``{glob:<pattern>}`` the one file matching the pattern when the step starts (a file named by an
earlier step, such as ``{glob:{out}/average/averaged_alpha*.ckpt}``), and an ``evaluate`` step gets
``--report_dir {out}/report`` unless it names one. Cells without
an ``evaluate`` step (a pre-training that others need) run but make no row.

Run: ``python -m robustft.leaderboard --cells experiments/leaderboard/cells.yaml --out runs/leaderboard
--table experiments/leaderboard``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustft.io import atomic_write_text

__all__ = ["Cell", "LeaderboardError", "build_table", "load_cells", "main", "run_cells", "write_table"]

_CELL_KEYS = {"label", "minutes", "default_score", "needs", "steps", "report"}
_SUBCOMMANDS = {"fit", "validate", "test", "evaluate", "average", "python"}
"""What a step may start with: a robustft subcommand, or ``python <script> ...`` for data preparation."""


class LeaderboardError(ValueError):
    """A cells file, a cell's step or the set of reports cannot make a fair leaderboard."""


@dataclass(frozen=True)
class Cell:
    """One leaderboard row: a method's recipe as CLI steps, and where its final report lands."""

    name: str
    label: str
    steps: tuple[tuple[str, ...], ...]
    minutes: float = 5.0
    default_score: str | None = None
    needs: tuple[str, ...] = ()
    report: str | None = "{out}/report/report.json"  # None: a helper cell without a row

    def out_dir(self, root: Path) -> Path:
        return root / self.name

    def argv(self, index: int, root: Path, eval_sets: Path | None) -> list[str]:
        """The ``python -m robustft`` arguments of step ``index`` with placeholders filled in."""
        out = self.out_dir(root)
        args = [a.replace("{out}", str(out)).replace("{root}", str(root)) for a in self.steps[index]]
        if args[0] == "evaluate":
            if eval_sets is not None:
                args += ["--config", str(eval_sets)]
            if "--report_dir" not in args:
                args += ["--report_dir", str(out / "report")]
        return args

    def report_path(self, root: Path) -> Path | None:
        if self.report is None:
            return None
        return Path(self.report.replace("{out}", str(self.out_dir(root))).replace("{root}", str(root)))


def load_cells(path: str | os.PathLike[str]) -> tuple[list[Cell], Path | None]:
    """Parse and validate a cells file; errors name the cell and the field."""
    path = Path(path)
    if not path.is_file():
        raise LeaderboardError(f"cells file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"cells", "eval_sets"}
    if unknown:
        raise LeaderboardError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected 'cells' and 'eval_sets'")
    eval_sets = Path(spec["eval_sets"]) if spec.get("eval_sets") else None
    if eval_sets is not None and not eval_sets.is_file():
        raise LeaderboardError(f"{path}: eval_sets file {eval_sets} does not exist")
    raw = spec.get("cells") or {}
    if not isinstance(raw, Mapping) or not raw:
        raise LeaderboardError(f"{path}: 'cells' must be a non-empty mapping of cell name -> cell")
    cells: list[Cell] = []
    for name, body in raw.items():
        where = f"{path}: cell '{name}'"
        if not isinstance(body, Mapping):
            raise LeaderboardError(f"{where} must be a mapping with 'label' and 'steps'")
        bad = set(body) - _CELL_KEYS
        if bad:
            raise LeaderboardError(f"{where}: unknown key(s) {sorted(bad)}; allowed: {sorted(_CELL_KEYS)}")
        steps = tuple(tuple(shlex.split(s)) if isinstance(s, str) else tuple(map(str, s)) for s in body.get("steps") or ())
        if not steps:
            raise LeaderboardError(f"{where}: 'steps' is empty; give at least one robustft subcommand")
        for step in steps:
            if step[0] not in _SUBCOMMANDS:
                raise LeaderboardError(f"{where}: step {' '.join(step)!r} must start with one of {sorted(_SUBCOMMANDS)}")
        has_eval = any(step[0] == "evaluate" for step in steps)
        report = body.get("report", "{out}/report/report.json" if has_eval else None)
        needs = tuple(body.get("needs") or ())
        known = {c.name for c in cells}
        missing = [n for n in needs if n not in known]
        if missing:
            raise LeaderboardError(f"{where}: 'needs' names {missing}, which are not cells listed before it")
        cells.append(Cell(name=str(name), label=str(body.get("label", name)), steps=steps,
                          minutes=float(body.get("minutes", 5.0)), default_score=body.get("default_score"),
                          needs=needs, report=report))
    return cells, eval_sets


# --------------------------------------------------------------------------------------- running


def _marker(out: Path, index: int) -> Path:
    return out / ".steps" / f"{index}.json"


def _command_digest(argv: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()


def _step_done(out: Path, index: int, argv: Sequence[str]) -> dict[str, Any] | None:
    marker = _marker(out, index)
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    return record if record.get("command_sha256") == _command_digest(argv) else None


def _resolve_globs(argv: Sequence[str], cell: str) -> list[str]:
    """``{glob:<pattern>}`` -> the one existing path matching ``<pattern>`` (an output whose name is only
    known after an earlier step ran, such as ``average``'s ``averaged_alpha<α>.ckpt``). The marker keeps
    the unresolved pattern, so reuse does not depend on which file an earlier run picked."""
    resolved = []
    for arg in argv:
        if arg.startswith("{glob:") and arg.endswith("}"):
            pattern = arg[len("{glob:"):-1]
            matches = sorted(Path("/").glob(pattern.lstrip("/"))) if pattern.startswith("/") else sorted(Path().glob(pattern))
            if len(matches) != 1:
                raise LeaderboardError(f"cell '{cell}': {arg} matches {len(matches)} files {[str(m) for m in matches]}; "
                                       "it must match exactly one (did the step that writes it run?)")
            arg = str(matches[0])
        resolved.append(arg)
    return resolved


_OUTPUT_FLAGS = ("--trainer.default_root_dir", "--trainer.logger.init_args.save_dir")


def _resume_args(argv: list[str], out: Path) -> list[str]:
    """An unfinished ``fit`` resumes from the newest ``last.ckpt`` in its own output folders (the values of
    its ``--trainer.default_root_dir`` / ``--trainer.logger.init_args.save_dir``; the cell's folder when
    it names neither), never from another step's checkpoint (a pre-training's, for a probe step)."""
    if argv[0] != "fit" or "--ckpt_path" in argv:
        return argv
    folders = [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in _OUTPUT_FLAGS] or [out]
    last = sorted({p for f in folders if f.is_dir() for p in f.rglob("last.ckpt")}, key=lambda p: p.stat().st_mtime)
    return argv + ["--ckpt_path", str(last[-1])] if last else argv


@dataclass
class CellRun:
    """What happened to one cell in this invocation."""

    name: str
    seconds: float = 0.0  # wall time of all its steps, including earlier invocations
    ran: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)


def _format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_cells(
    cells: Sequence[Cell],
    root: str | os.PathLike[str],
    eval_sets: Path | None = None,
    only: Sequence[str] | None = None,
    python: str = sys.executable,
    echo: Callable[[str], None] = print,
) -> list[CellRun]:
    """Run (or reuse) every step of every selected cell, in order; return what was run and reused.

    Each step is a ``python -m robustft`` subprocess (its own seeds and global state; Lightning's own
    progress bar shows inside it). A failing step stops the leaderboard with the cell and the command
    named; its finished predecessors stay reusable.
    """
    root = Path(root)
    by_name = {c.name: c for c in cells}
    selected = [c for c in cells if not only or c.name in only]
    if only:
        unknown = sorted(set(only) - set(by_name))
        if unknown:
            raise LeaderboardError(f"--only names unknown cell(s) {unknown}; cells: {sorted(by_name)}")
        wanted = {n for c in selected for n in c.needs} | {c.name for c in selected}
        selected = [c for c in cells if c.name in wanted]
    runs: list[CellRun] = []
    remaining = sum(c.minutes for c in selected) * 60.0
    started = time.perf_counter()
    for position, cell in enumerate(selected, 1):
        out = cell.out_dir(root)
        run = CellRun(cell.name)
        redo = False  # a changed step invalidates the steps after it
        for index in range(len(cell.steps)):
            argv = cell.argv(index, root, eval_sets)
            record = None if redo else _step_done(out, index, argv)
            if record is not None:
                run.reused.append(index)
                run.seconds += float(record["seconds"])
                continue
            redo = True
            elapsed = time.perf_counter() - started
            echo(f"[leaderboard {position}/{len(selected)}] {cell.name} step {index + 1}/{len(cell.steps)}: "
                 f"robustft {' '.join(argv[:3])} ... | elapsed {_format_minutes(elapsed)}, "
                 f"ETA cell ~{cell.minutes:.0f} min, all ~{_format_minutes(remaining)}")
            out.mkdir(parents=True, exist_ok=True)
            full = _resume_args(_resolve_globs(argv, cell.name), out)
            step_start = time.perf_counter()
            command = [python, *full[1:]] if full[0] == "python" else [python, "-m", "robustft", *full]
            done = subprocess.run(command, check=False)
            seconds = time.perf_counter() - step_start
            if done.returncode != 0:
                raise LeaderboardError(
                    f"cell '{cell.name}' step {index + 1} failed (exit {done.returncode}): "
                    f"{shlex.join(command)}\nFix it and rerun: finished steps are reused."
                )
            marker = _marker(out, index)
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"command": argv, "command_sha256": _command_digest(argv),
                                                  "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            run.ran.append(index)
            run.seconds += seconds
        if run.ran:
            echo(f"[leaderboard] {cell.name}: ran steps {[i + 1 for i in run.ran]} in {_format_minutes(run.seconds)}")
        else:
            echo(f"[leaderboard] {cell.name}: reused all {len(cell.steps)} finished step(s)")
        remaining = max(0.0, remaining - cell.minutes * 60.0)
        runs.append(run)
    return runs


# --------------------------------------------------------------------------------------- table

COLUMNS = ("cell", "method", "score", "id_acc", "near_auroc", "near_fpr95", "far_auroc", "far_fpr95", "minutes")


def _sets_signature(report: Mapping[str, Any]) -> tuple:
    """ID size and every OOD set with its size: equal signatures mean the same test data."""
    ood = tuple(sorted((name, next(iter(scores.values())).get("n")) for name, scores in report["ood"].items()))
    groups = tuple(sorted((g, tuple(next(iter(rows.values()))["sets"])) for g, rows in report["groups"].items() if rows))
    return report["id"]["n"], ood, groups


def _group_metric(report: Mapping[str, Any], group: str, score: str, metric: str) -> float | None:
    row = report.get("groups", {}).get(group, {}).get(score)
    return None if row is None else float(row[metric])


def build_table(cells: Sequence[Cell], root: str | os.PathLike[str], seconds: Mapping[str, float]) -> dict[str, Any]:
    """One row per cell (its default score) plus one row per (cell, score) for every score it computed.

    Raises :class:`LeaderboardError` when two reports were computed on different test data.
    """
    root = Path(root)
    rows: list[dict[str, Any]] = []
    all_scores: list[dict[str, Any]] = []
    signature: tuple | None = None
    reference = ""
    for cell in cells:
        path = cell.report_path(root)
        if path is None:
            continue
        if not path.is_file():
            raise LeaderboardError(f"cell '{cell.name}' has no report at {path}; run the leaderboard first")
        report = json.loads(path.read_text())
        sig = _sets_signature(report)
        if signature is None:
            signature, reference = sig, cell.name
        elif sig != signature:
            raise LeaderboardError(
                f"cell '{cell.name}' was evaluated on other test data than '{reference}' "
                f"({sig} vs {signature}); every evaluate step must use the cells file's eval_sets"
            )
        meta = report.get("meta", {})
        score = cell.default_score or meta.get("default_score") or next(iter(report["groups"].get("far", {})), None)
        acc = report["id"].get("acc")
        base = {"cell": cell.name, "method": cell.label,
                "id_acc": None if acc is None else float(acc),
                "id_acc_note": meta.get("id_acc_note") if acc is None else None,
                "minutes": round(seconds.get(cell.name, 0.0) / 60.0, 2)}
        for name in report["groups"].get("far", {}) or next(iter(report["ood"].values())):
            entry = {**base, "score": name, **{f"{g}_{m}": _group_metric(report, g, name, m)
                                              for g in ("near", "far") for m in ("auroc", "fpr95")}}
            all_scores.append(entry)
            if name == score:
                per_set = {s: {m: float(v[name][m]) for m in ("auroc", "fpr95")}
                           for s, v in report["ood"].items() if name in v}
                rows.append({**entry, "sets": per_set})
        if not any(r["cell"] == cell.name for r in rows):
            raise LeaderboardError(f"cell '{cell.name}': default score '{score}' is not in its report; "
                                   f"set the cell's default_score to one of {sorted(report['groups'].get('far', {}))}")
    if signature is None:
        raise LeaderboardError("no cell produced a report; add an evaluate step to at least one cell")
    return {"rows": rows, "all_scores": all_scores,
            "test_data": {"id_n": signature[0], "ood": [list(x) for x in signature[1]],
                          "groups": {g: list(s) for g, s in signature[2]}}}


def _cell(value: Any, pct: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}" if pct else str(value)


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    head = "| method | score | ID acc | near AUROC | near FPR@95 | far AUROC | far FPR@95 | minutes |"
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        acc = _cell(r["id_acc"], True) if r["id_acc"] is not None else f"n/a ({r.get('id_acc_note') or 'no classifier'})"
        lines.append(f"| {r['method']} | {r['score']} | {acc} | {_cell(r['near_auroc'], True)} | "
                     f"{_cell(r['near_fpr95'], True)} | {_cell(r['far_auroc'], True)} | {_cell(r['far_fpr95'], True)} | "
                     f"{r['minutes']} |")
    return "\n".join(lines) + "\n"


def write_table(table: Mapping[str, Any], folder: str | os.PathLike[str], title: str = "Leaderboard") -> dict[str, Path]:
    """Write ``leaderboard.{md,csv,json}`` and, when matplotlib is installed, ``leaderboard_scatter.png``
    (AUROC vs FPR@95) and ``leaderboard_sets.png`` (AUROC per OOD set)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = table["test_data"]
    groups = "; ".join(f"{g}: {', '.join(sets)}" for g, sets in data["groups"].items())
    md = [f"# {title}", "",
          "Default score of each method (percent; near/far = unweighted mean over the group's sets):", "",
          _markdown(table["rows"]),
          "Every score each method computed:", "", _markdown(table["all_scores"]),
          f"Test data (identical for every row): {data['id_n']} ID test images; OOD sets (name, n): "
          f"{', '.join(f'{n} ({k})' for n, k in data['ood'])}; groups: "
          f"{groups}.", ""]
    paths = {"md": folder / "leaderboard.md", "csv": folder / "leaderboard.csv", "json": folder / "leaderboard.json"}
    atomic_write_text(paths["md"], "\n".join(md))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "id_acc_note"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table["all_scores"])
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps(table, indent=2) + "\n")
    paths.update(_write_figures(table["rows"], folder))
    return paths


def _write_figures(rows: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, Path]:
    """AUROC-vs-FPR@95 scatter (near and far means) and per-set AUROC bars of each default score."""
    from robustft import plots

    if not plots.plots_available():
        plots.warn_plots_unavailable("leaderboard figures")
        return {}
    points = {r["method"]: {g: {"auroc": r[f"{g}_auroc"], "fpr95": r[f"{g}_fpr95"]} for g in ("near", "far")
                            if r[f"{g}_auroc"] is not None} for r in rows}
    bars = {r["method"]: {s: v["auroc"] for s, v in r["sets"].items()} for r in rows}
    return {"scatter": plots.save_figure(plots.auroc_fpr_scatter_figure(points), folder / "leaderboard_scatter.png"),
            "bars": plots.save_figure(plots.per_set_bars_figure(bars), folder / "leaderboard_sets.png")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustft.leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", required=True, help="the cells YAML file")
    parser.add_argument("--out", required=True, help="output folder of the runs (reused by a rerun)")
    parser.add_argument("--table", help="folder for leaderboard.{md,csv,json} (needed when a cell evaluates)")
    parser.add_argument("--only", nargs="*", help="run only these cells (and the cells they need)")
    parser.add_argument("--title", default="Leaderboard")
    args = parser.parse_args(argv)
    try:
        cells, eval_sets = load_cells(args.cells)
        runs = run_cells(cells, args.out, eval_sets, only=args.only)
        ran = {r.name for r in runs}
        rows = [c for c in cells if c.name in ran and c.report is not None]
        if not rows:  # e.g. experiments/robustness: `average` steps only, tabulated by their own script
            print("[leaderboard] no cell has an evaluate step: every step ran, no leaderboard table to write")
            return 0
        if args.table is None:
            raise LeaderboardError("--table is required when cells have evaluate steps (where leaderboard.md goes)")
        table = build_table(rows, args.out, {r.name: r.seconds for r in runs})
        paths = write_table(table, args.table, args.title)
    except LeaderboardError as error:
        print(f"robustft.leaderboard: error: {error}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
