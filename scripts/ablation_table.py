#!/usr/bin/env python3
"""Markdown table of every ablation run under a folder (default
.cache/runs/ablation): one row per init, validation Dice per held-out case and
their mean at the last step (mean ± sample sd over the seeds run), and the
mean Dice at each validation step. Reads the `validation.json` each run
writes, so runs from several `infl8-train ablate` invocations (or a resumed
one) end up in one table. Standard library only.

    scripts/ablation_table.py [RUNS_DIR] > docs/ablation/results.md
"""

import json
import statistics
import sys
from pathlib import Path

ORDER = ["inflated", "inflated-average", "scratch", "2d"]


def fmt(values):
    m = statistics.mean(values)
    if len(values) > 1:
        return f"{m:.3f} ± {statistics.stdev(values):.3f}"
    return f"{m:.3f}"


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/runs/ablation")
    runs = {}
    for path in sorted(root.glob("*-seed*/validation.json")):
        init, _, seed = path.parent.name.rpartition("-seed")
        summary, vals = json.loads(path.read_text())
        if not vals:
            continue
        runs.setdefault(init, []).append((int(seed), summary, vals))
    if not runs:
        sys.exit(f"ablation_table: no */validation.json under {root}")
    inits = [i for i in ORDER if i in runs] + sorted(set(runs) - set(ORDER))
    cases = [c for c, _ in runs[inits[0]][0][2][-1]["per_volume"]]
    steps = [v["step"] for v in runs[inits[0]][0][2]]
    head = ["init", "seeds"] + [f"{c} (last)" for c in cases] + ["mean (last)"]
    head += [f"mean @{s}" for s in steps]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for init in inits:
        arm = sorted(runs[init], key=lambda r: r[0])
        row = [init, ",".join(str(s) for s, _, _ in arm)]
        for i, _ in enumerate(cases):
            row.append(fmt([vals[-1]["per_volume"][i][1][0] for _, _, vals in arm]))
        row.append(fmt([vals[-1]["mean_dice"] for _, _, vals in arm]))
        for k, _ in enumerate(steps):
            row.append(fmt([vals[k]["mean_dice"] for _, _, vals in arm if k < len(vals)]))
        print("| " + " | ".join(row) + " |")
    secs = [s["seconds"] for arm in runs.values() for _, s, _ in arm]
    print(
        f"\n{sum(len(a) for a in runs.values())} runs, "
        f"{statistics.mean(secs) / 60:.1f} min each on average "
        f"(training + validation). Dice of the brain label on the held-out "
        f"volumes through infl8's own inference and post-processing."
    )


if __name__ == "__main__":
    main()
