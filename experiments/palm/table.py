"""Print the result table of experiments/palm/README.md from the two evaluation reports.

    .venv/bin/python experiments/palm/table.py   # after experiments/palm/run.sh

Rows: every score of each run; AUROC / FPR95 (%, FPR95 = OOD accepted at 95% ID recall) on the
near set (tin) and the far sets (dtd, mnist, and their mean). The CE baseline's "best" score is the one
with the highest mean of near and far AUROC **on these test sets** -- an oracle choice that favours
the baseline (no OOD validation set was used to pick it).
"""

from __future__ import annotations

import json
from pathlib import Path

RUNS = {"PALM": "runs/palm/offline/report/report.json", "CE": "runs/palm/ce_offline/report/report.json"}


def main() -> None:
    print("| method | score | ID acc | tin AUROC | tin FPR95 | dtd AUROC | dtd FPR95 | mnist AUROC | mnist FPR95 "
          "| far AUROC | far FPR95 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, path in RUNS.items():
        report = json.loads(Path(path).read_text())
        ood, groups = report["ood"], report["groups"]
        scores = list(ood["tin"])
        best = max(scores, key=lambda s: groups["near"][s]["auroc"] + groups["far"][s]["auroc"])
        for score in scores:
            cells = [method, f"**{score}**" if (method == "CE" and score == best) else score,
                     f"{100 * report['id']['acc']:.2f}"]
            for row in (ood["tin"][score], ood["dtd"][score], ood["mnist"][score], groups["far"][score]):
                cells += [f"{100 * row['auroc']:.2f}", f"{100 * row['fpr95']:.2f}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
