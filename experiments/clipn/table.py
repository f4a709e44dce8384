"""Markdown table of the CLIPN study (runs/clipn/<tag>/seed*/report.json): AUROC / FPR95 in %, mean over seeds.

    python experiments/clipn/table.py learnable_other_class_e3 learnable_all_e3 ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parents[2] / "runs" / "clipn"
SETS = ("tin", "mnist", "dtd")


def cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * statistics.pstdev(values):.2f}"


def rows(tag: str) -> list[str]:
    reports = [json.loads(p.read_text()) for p in sorted(RUNS.glob(f"{tag}/seed*/report/report.json"))]
    decisions = [json.loads(p.read_text())["decisions"] for p in sorted(RUNS.glob(f"{tag}/seed*/decisions.json"))]
    out = []
    for score in ("atd", "ctw", "mcm"):
        cells = []
        for metric in ("auroc", "fpr95"):
            for s in SETS:
                cells.append(cell([r["ood"][s][score][metric] for r in reports]))
            cells.append(cell([r["groups"]["far"][score][metric] for r in reports]))
        label = "MCM (= zero-shot)" if score == "mcm" else score.upper()
        out.append(f"| {tag} | {len(reports)} | {label} | " + " | ".join(cells) + " |")
    acc = cell([r["id"]["acc"] for r in reports])
    flagged = {rule: {name: cell([d[name][f"{rule}_ood"] for d in decisions]) for name in decisions[0]}
               for rule in ("ctw", "atd")}
    out.append(f"<!-- {tag}: ID acc {acc}; fraction called OOD {json.dumps(flagged)} -->")
    return out


if __name__ == "__main__":
    header = ("| run | seeds | score | AUROC TIN (near) | AUROC MNIST | AUROC DTD | AUROC far mean | FPR95 TIN | "
              "FPR95 MNIST | FPR95 DTD | FPR95 far mean |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for tag in sys.argv[1:]:
        print("\n".join(rows(tag)))
