"""Tabulate the robustness cells (experiments/robustness/cells.yaml): one row per method, ID accuracy vs
accuracy under the CIFAR-10-C-style corruptions (severities 3 and 5) and on the 200 lossless PNG images,
plus an ID-vs-shifted figure in the style of WiSE-FT's figure 1 (the alpha sweeps of WiSE-FT and BANG as
curves, the other methods as points).

    .venv/bin/python experiments/robustness/table.py --runs runs/robustness --out experiments/robustness

Each row is the alpha ``average`` chose on ID validation (WiSE-FT, BANG) or alpha = 1 (the model as trained).
Reads ``<runs>/<cell>/average/average.json``; the cells' labels come from the cells file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _row(label: str, average: dict) -> dict:
    meta = average["meta"]
    chosen = meta.get("chosen_alpha")
    rows = average["rows"]
    row = next(r for r in rows if chosen is None or abs(r["alpha"] - chosen) < 1e-9) if chosen is not None else rows[-1]
    corruptions = [k for k in row if k.startswith("shift/") and k != "shift/png_lossless"]
    return {
        "method": label,
        "alpha": row["alpha"],
        "id_acc": row["id_acc"],
        "corruption_mean": sum(row[k] for k in corruptions) / len(corruptions),
        **{k.removeprefix("shift/"): row[k] for k in corruptions},
        "png_lossless": row.get("shift/png_lossless"),
        "shift_mean": row["shift_mean"],
        "sweep": [(r["alpha"], r["id_acc"], r["shift_mean"]) for r in rows],
    }


def _markdown(rows: list[dict]) -> str:
    corr = [k for k in rows[0] if "-" in k and k.split("-")[-1].isdigit()]
    head = ["method", "alpha", "ID acc", "corruption mean", *corr, "PNG lossless", "shifted mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['alpha']:.2f}", f"{100 * r['id_acc']:.2f}", f"{100 * r['corruption_mean']:.2f}",
                 *(f"{100 * r[c]:.2f}" for c in corr),
                 "n/a" if r["png_lossless"] is None else f"{100 * r['png_lossless']:.2f}", f"{100 * r['shift_mean']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.0))
    for i, r in enumerate(rows):
        color = plt.get_cmap("tab10")(i)
        if len(r["sweep"]) > 1:  # a weight-space sweep: the curve over alpha, the chosen alpha as a star
            ax.plot([100 * s[1] for s in r["sweep"]], [100 * s[2] for s in r["sweep"]], "-o", color=color, markersize=4,
                    label=f"{r['method']} (alpha 0..1)")
            ax.plot([100 * r["id_acc"]], [100 * r["shift_mean"]], "*", color=color, markersize=14, markeredgecolor="black")
        else:
            ax.plot([100 * r["id_acc"]], [100 * r["shift_mean"]], "s", color=color, markersize=9, markeredgecolor="black",
                    label=r["method"])
    ax.set_xlabel("ID test accuracy (%)")
    ax.set_ylabel("shifted accuracy: mean over corruptions + PNG set (%)")
    ax.set_title("ID vs shifted accuracy (stars: alpha chosen on ID validation)")
    ax.grid(True, color="0.9")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/robustness"))
    parser.add_argument("--cells", type=Path, default=HERE / "cells.yaml")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    cells = yaml.safe_load(args.cells.read_text())["cells"]
    rows = []
    for name, cell in cells.items():
        path = args.runs / name / "average" / "average.json"
        if path.is_file():
            rows.append(_row(cell.get("label", name), json.loads(path.read_text())))
        else:
            print(f"skipping {name}: no {path}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.md").write_text(_markdown(rows))
    (args.out / "robustness.json").write_text(json.dumps(rows, indent=1) + "\n")
    _figure(rows, args.out / "robustness.png")
    print(_markdown(rows))


if __name__ == "__main__":
    main()
