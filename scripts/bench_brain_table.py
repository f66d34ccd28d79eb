"""Turns scripts/bench-brain.sh's measured runs into docs/brain-benchmark.md's table.

Reads the runs (one JSON file per scan and tool in --runs: scan, tool,
seconds, load_before, dice, hd95_mm, volume_error or error), writes them all
to --json, replaces the text between the
bench-brain markers of --doc with the table, and prints each tool's
lowest-Dice scan (tab-separated) for the worst-case figures. No number in the
table comes from anywhere else.
"""

import argparse
import glob
import json
import os
import sys

BEGIN = "<!-- bench-brain:table:begin (scripts/bench-brain.sh writes this part) -->"
END = "<!-- bench-brain:table:end -->"
CARD_BEGIN = "<!-- bench-brain:card:begin (scripts/bench-brain.sh writes this part) -->"
CARD_END = "<!-- bench-brain:card:end -->"
TOOLS = {
    "infl8": "infl8 brain-mask (tract)",
    "robex": "ROBEX 1.2",
    "deepbet": "deepbet 1.0.2",
}


def cell(run):
    if run is None:
        return "not run"
    if "error" in run:
        return "failed"
    parts = []
    parts.append("—" if run.get("dice") is None else f"**{run['dice']:.3f}**")
    parts.append("—" if run.get("hd95_mm") is None else f"{run['hd95_mm']:.1f} mm")
    ve = run.get("volume_error")
    parts.append("—" if ve is None else f"{100 * ve:+.1f} %")
    parts.append(f"{run['seconds']:.1f} s")
    return " / ".join(parts)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table(runs, machine, model, infl8):
    scans = list(dict.fromkeys(r["scan"] for r in runs))
    tools = [t for t in TOOLS if any(r["tool"] == t for r in runs)]
    by = {(r["scan"], r["tool"]): r for r in runs}
    lines = [
        BEGIN,
        "",
        f"Each cell: **Dice** / HD95 / volume error / seconds per scan (model `{model}`; "
        f"`{infl8}` timed; measured on {machine}, one run at a time; the load average "
        "before each run is in results.json).",
        "",
        "| scan | " + " | ".join(TOOLS[t] for t in tools) + " |",
        "| --- |" + " --- |" * len(tools),
    ]
    for s in scans:
        lines.append(f"| `{s}` | " + " | ".join(cell(by.get((s, t))) for t in tools) + " |")
    ok = lambda t, key: [by[(s, t)].get(key) for s in scans if (s, t) in by and "error" not in by[(s, t)]]
    summary = []
    for t in tools:
        d, h, sec = mean(ok(t, "dice")), mean(ok(t, "hd95_mm")), mean(ok(t, "seconds"))
        ve = mean([abs(v) if v is not None else None for v in ok(t, "volume_error")])
        worst = min((x for x in ok(t, "dice") if x is not None), default=None)
        summary.append(
            "—" if d is None else
            f"**{d:.3f}** (min {worst:.3f}) / {h:.1f} mm / {100 * ve:.1f} % / {sec:.1f} s"
        )
    lines.append("| **mean** (min Dice; absolute volume error) | " + " | ".join(summary) + " |")
    lines += ["", END]
    return "\n".join(lines)


def card(runs):
    """Dice and HD95 per scan and tool, for the model card."""
    scans = list(dict.fromkeys(r["scan"] for r in runs))
    tools = [t for t in TOOLS if any(r["tool"] == t for r in runs)]
    by = {(r["scan"], r["tool"]): r for r in runs}

    def short(run):
        if run is None or run.get("dice") is None:
            return "—" if run is None else "failed"
        hd = run.get("hd95_mm")
        return f"{run['dice']:.3f} ({hd:.1f} mm)" if hd is not None else f"{run['dice']:.3f}"

    lines = [
        CARD_BEGIN,
        "",
        "| scan | " + " | ".join(TOOLS[t] for t in tools) + " |",
        "| --- |" + " --- |" * len(tools),
    ]
    for sc in scans:
        lines.append(f"| `{sc}` | " + " | ".join(short(by.get((sc, t))) for t in tools) + " |")
    lines += ["", CARD_END]
    return "\n".join(lines)


def replace_between(path, begin, end, text):
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        sys.exit(f"{path}: the bench-brain markers are missing")
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(head + text + tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", required=True, help="folder of <scan>.<tool>.json")
    ap.add_argument("--json", required=True)
    ap.add_argument("--doc", required=True)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--card", help="model card whose peer rows to rewrite")
    ap.add_argument("--infl8", required=True, help="the infl8 binary that was timed")
    a = ap.parse_args()
    runs = []
    for path in glob.glob(os.path.join(a.runs, "*.json")):
        with open(path) as f:
            runs.append(json.load(f))
    if not runs:
        sys.exit(f"{a.runs}: no runs")
    # Subjects first, then each one's variants, in the script's order.
    variants = ["", "-thick", "-bias-noise", "-fov-cut", "-oblique"]

    def order(r):
        for i, v in enumerate(variants[1:], 1):
            if r["scan"].endswith(v):
                return (r["scan"][: -len(v)], i, r["tool"])
        return (r["scan"], 0, r["tool"])

    runs.sort(key=order)
    with open(a.json, "w") as f:
        json.dump({"machine": a.machine, "model": a.model, "infl8": a.infl8, "runs": runs}, f, indent=1)
        f.write("\n")
    replace_between(a.doc, BEGIN, END, table(runs, a.machine, a.model, a.infl8))
    if a.card:
        replace_between(a.card, CARD_BEGIN, CARD_END, card(runs))
    for t in TOOLS:
        scored = [r for r in runs if r["tool"] == t and r.get("dice") is not None]
        if scored:
            w = min(scored, key=lambda r: r["dice"])
            print(f"{t}\t{w['scan']}")


if __name__ == "__main__":
    main()
