"""Build the README table from the `evaluate` reports of the offline Local-Prompt runs.

Usage: python experiments/local_prompt/table.py runs/local_prompt/4shot_seed1/eval runs/local_prompt/4shot_seed2/eval
Prints, per score, FPR95 (the report's `fpr95`: Hendrycks fpr_and_fdr_at_recall, the Local-Prompt/MCM
convention) and AUROC for every OOD set and their mean, as the mean (± half-range) over the given runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCORES = ["mcm", "glmcm", "regional_mcm", "local_prompt"]


def main(dirs: list[str]) -> None:
    reports = [json.loads((Path(d) / "report.json").read_text()) for d in dirs]
    sets = list(reports[0]["ood"])
    head = " | ".join(f"{s} FPR95 / AUROC" for s in [*sets, "mean"])
    print(f"| score | {head} |")
    print("|---" * (len(sets) + 2) + "|")

    def fmt(values: list[float]) -> str:
        m = sum(values) / len(values)
        half = (max(values) - min(values)) / 2
        return f"{100 * m:.1f}" + (f"±{100 * half:.1f}" if len(values) > 1 else "")

    for score in SCORES:
        cells = []
        for s in sets:
            fpr = [r["ood"][s][score]["fpr95"] for r in reports]
            auc = [r["ood"][s][score]["auroc"] for r in reports]
            cells.append(f"{fmt(fpr)} / {fmt(auc)}")
        fpr_mean = [sum(r["ood"][s][score]["fpr95"] for s in sets) / len(sets) for r in reports]
        auc_mean = [sum(r["ood"][s][score]["auroc"] for s in sets) / len(sets) for r in reports]
        cells.append(f"**{fmt(fpr_mean)}** / **{fmt(auc_mean)}**")
        print(f"| {score} | " + " | ".join(cells) + " |")
    accs = [r["id"]["acc"] for r in reports]
    print(f"\nID accuracy (local-aware classifier): {fmt(accs)}% (n = {reports[0]['id']['n']}); per run: "
          + ", ".join(f"{100 * a:.2f}%" for a in accs))


if __name__ == "__main__":
    main(sys.argv[1:])
