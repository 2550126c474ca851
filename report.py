"""
The built-in demo's table, in the shape of the paper's: test accuracy per method, as text, JSON and an SVG chart.

    python report.py out/demo                           # one run: OUT/results.json, OUT/results.svg
    python report.py out/demo-s0 out/demo-s1 out/demo-s2 --out out/summary   # mean ± std over seeds
    python report.py sweep out/demo                     # the learning-rate sweep on the validation problems
    python report.py agent out/agent [out/agent-s1 ...]  # the agent demo: success on the seen and unseen tasks

Reads the search.py eval files that train.sh writes under OUT/eval/ (and OUT/sweep/ for the sweep).
"""
import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

# (row label, eval file under OUT/eval, method in that file, group); {B}, {K}, {R} stand for any beam width,
# best-of-K size and iteration round found in the files. A label ending in "(beam problems)" is the same method
# counted only on the problems the beam search was run on (train.sh runs it on a subset to stay within minutes).
ROWS = [
    ("SFT greedy", "sft", "greedy", "baseline"),
    ("SFT sampling (T = 1)", "sft", "sample", "baseline"),
    ("RS greedy", "rs", "greedy", "baseline"),
    ("DPO greedy", "dpo", "greedy", "baseline"),
    ("OREO-token greedy", "oreo", "greedy", "oreo"),
    ("OREO-step greedy", "oreo_step", "greedy", "oreo"),
    ("OREO-token round {R} greedy", "oreo_r{R}", "greedy", "oreo"),
    ("OREO-token greedy (beam problems)", "oreo", "greedy", "search"),
    ("OREO + value beam B = {B}", "beam_oreo", "beam{B}", "search"),
    ("SFT greedy (beam problems)", "sft", "greedy", "search"),
    ("SFT policy + OREO value beam B = {B}", "beam_sft", "beam{B}", "search"),
    ("1 of {K} SFT samples chosen by OREO value", "choice", "bestof{K}:by_value", "choice"),
    ("1 of {K} SFT samples chosen at random", "choice", "bestof{K}:random", "choice"),
    ("1 of {K} SFT samples: best possible", "choice", "bestof{K}:best_possible", "choice"),
]
BEAM_FILE = {"oreo": "beam_oreo", "sft": "beam_sft"}   # whose problems a "(beam problems)" row counts
COLORS = {"baseline": "#9e9e9e", "oreo": "#1f77b4", "search": "#2ca02c", "choice": "#ff7f0e"}


def read_run(out):
    """{row label: (accuracy, number of problems, group)} of one output folder, in ROWS order; rows whose eval
    file is absent are left out."""
    evals = {p.stem: json.loads(p.read_text()) for p in sorted(Path(out, "eval").glob("*.json"))}
    if not evals:
        sys.exit(f"report.py: no eval files in {out}/eval (run bash train.sh --out {out} first)")
    rows = {}
    for label, name, method, group in ROWS:
        files = [f for f in evals if re.fullmatch(name.replace("{R}", r"(\d+)"), f)]
        for file in sorted(files, key=lambda f: [int(d) for d in re.findall(r"\d+", f)]):
            ev = evals[file]
            kind, _, field = method.partition(":")
            keys = [k for k in (ev["choice"] if field else ev["summary"])
                    if re.fullmatch(kind.replace("{B}", r"\d+").replace("{K}", r"\d+"), k)]
            for key in keys:
                if field:
                    accuracy, n = ev["choice"][key][field], len(ev["per_problem"][key])
                else:
                    results = ev["per_problem"][key]
                    if label.endswith("(beam problems)"):
                        subset = evals.get(BEAM_FILE[name])
                        if subset is None:
                            continue
                        ids = {r["id"] for r in next(iter(subset["per_problem"].values()))}
                        results = [r for r in results if r["id"] in ids]
                    accuracy, n = sum(r["reward"] for r in results) / len(results), len(results)
                width = re.sub(r"\D", "", key)
                rows[label.format(B=width, K=width, R=file.removeprefix("oreo_r"))] = (accuracy, n, group)
    return rows


def combine(runs):
    """Rows present in every run -> {label: {"mean", "std", "seeds": [...], "group"}} (std 0 for one run)."""
    table = {}
    for label, (_, n, group) in runs[0].items():
        if all(label in r for r in runs):
            xs = [r[label][0] for r in runs]
            table[label] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                            "seeds": xs, "problems": n, "group": group}
    return table


def svg_chart(table, title):
    """Horizontal bars (accuracy 0..1) with ±std whiskers, one row per table line; plain SVG, no dependency."""
    left, width, row_h, top = 340, 380, 24, 40
    height = top + row_h * len(table) + 40
    x = lambda a: left + width * a   # accuracy -> pixel
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 70}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="10" y="22" font-size="14" font-weight="bold">{escape(title)}</text>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top - 4}" x2="{x(tick):.1f}" y2="{height - 30}" '
                     f'stroke="#ddd"/><text x="{x(tick):.1f}" y="{height - 14}" text-anchor="middle">{tick:g}</text>')
    for i, (label, row) in enumerate(table.items()):
        y = top + i * row_h
        lo, hi = max(0.0, row["mean"] - row["std"]), min(1.0, row["mean"] + row["std"])
        parts += [f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{escape(label)} (n={row["problems"]})</text>',
                  f'<rect x="{left}" y="{y + 4}" width="{width * row["mean"]:.1f}" height="{row_h - 8}" '
                  f'fill="{COLORS[row["group"]]}"/>',
                  f'<line x1="{x(lo):.1f}" y1="{y + 12}" x2="{x(hi):.1f}" y2="{y + 12}" stroke="black"/>',
                  f'<text x="{x(hi) + 6:.1f}" y="{y + 16}">{row["mean"]:.3f}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt(row):
    return f"{row['mean']:.3f}" + (f" ± {row['std']:.3f}" if len(row["seeds"]) > 1 else "")


def report(outs, dest):
    table = combine([read_run(o) for o in outs])
    n = len(outs)
    print(f"{'test accuracy' + (f' (mean ± std over {n} seeds)' if n > 1 else ''):<46} {'problems':>8}")
    for label, row in table.items():
        seeds = "  [" + " ".join(f"{x:.3f}" for x in row["seeds"]) + "]" if n > 1 else ""
        print(f"{label:<46} {row['problems']:8d}  {fmt(row)}{seeds}")
    os.makedirs(dest, exist_ok=True)
    write(Path(dest, "results.json"), json.dumps({"runs": [str(o) for o in outs], "table": table}, indent=1))
    title = f"Built-in task: test accuracy ({n} seed{'s' if n > 1 else ''}" + (", mean ± std)" if n > 1 else ")")
    write(Path(dest, "results.svg"), svg_chart(table, title))
    print(f"report.py: wrote {dest}/results.json and {dest}/results.svg")


# the agent demo: (row label, eval file under OUT/eval, method in it, group), for each split
AGENT_ROWS = [("SFT", "sft", "greedy", "baseline"), ("RS", "rs", "greedy", "baseline"),
              ("DPO", "dpo", "greedy", "baseline"), ("OREO-token", "oreo", "greedy", "oreo"),
              ("OREO-step", "oreo_step", "greedy", "oreo"), ("OREO-token + best-of-{K}", "oreo", "bestof{K}", "search"),
              ("OREO-step + best-of-{K}", "oreo_step", "bestof{K}", "search")]


def read_agent_run(out):
    """{"split: label": (success rate, episodes, group)} from the agent.py eval files of one output folder."""
    evals = {p.stem: json.loads(p.read_text()) for p in sorted(Path(out, "eval").glob("*.json"))}
    if not evals:
        sys.exit(f"report.py: no eval files in {out}/eval (run bash train.sh agent --out {out} first)")
    rows = {}
    for split in ("seen", "unseen"):
        for label, name, method, group in AGENT_ROWS:
            summary = evals.get(name, {}).get("summary", {}).get(split, {})
            for key in [k for k in summary if re.fullmatch(method.replace("{K}", r"\d+"), k)]:
                k = re.sub(r"\D", "", key)
                rows[f"{split}: {label.format(K=k)}"] = (summary[key]["success"], summary[key]["episodes"], group)
    return rows


def agent_report(outs, dest):
    table = combine([read_agent_run(o) for o in outs])
    n = len(outs)
    print(f"{'success rate' + (f' (mean ± std over {n} seeds)' if n > 1 else ''):<46} {'episodes':>8}")
    for label, row in table.items():
        seeds = "  [" + " ".join(f"{x:.3f}" for x in row["seeds"]) + "]" if n > 1 else ""
        print(f"{label:<46} {row['problems']:8d}  {fmt(row)}{seeds}")
    os.makedirs(dest, exist_ok=True)
    write(Path(dest, "results.json"), json.dumps({"runs": [str(o) for o in outs], "table": table}, indent=1))
    title = f"Agent demo: success rate ({n} seed{'s' if n > 1 else ''}" + (", mean ± std)" if n > 1 else ")")
    write(Path(dest, "results.svg"), svg_chart(table, title))
    print(f"report.py: wrote {dest}/results.json and {dest}/results.svg")


def sweep(outs):
    """Validation accuracy per (method, learning rate), averaged over the given runs; the best rate per method."""
    acc = {}
    for out in outs:
        for path in sorted(Path(out, "sweep").glob("*.json")):
            method, lr = path.stem.rsplit("-lr", 1)
            acc.setdefault(method, {}).setdefault(lr, []).append(json.loads(path.read_text())["summary"]["greedy"]
                                                                 ["accuracy"])
    if not acc:
        sys.exit(f"report.py: no sweep results in {outs[0]}/sweep (run bash train.sh sweep first)")
    result = {"runs": [str(o) for o in outs], "validation_accuracy": {}, "best_lr": {}}
    print(f"{'method':<10} " + "  ".join(f"lr {lr:>6}" for lr in sorted(next(iter(acc.values())), key=float)))
    for method, by_lr in acc.items():
        means = {lr: statistics.fmean(xs) for lr, xs in sorted(by_lr.items(), key=lambda kv: float(kv[0]))}
        result["validation_accuracy"][method] = means
        result["best_lr"][method] = max(means, key=lambda lr: (means[lr], -float(lr)))   # ties: the smaller rate
        print(f"{method:<10} " + "  ".join(f"{a:9.3f}" for a in means.values()) +
              f"   best {result['best_lr'][method]}")
    write(Path(outs[0], "sweep.json"), json.dumps(result, indent=1))
    print(f"report.py: wrote {outs[0]}/sweep.json")


def write(path, text):
    tmp = path.with_name(path.name + ".tmp")   # atomic: a reader never sees half a file
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.sh output folders (one per seed), or: sweep FOLDER ..., "
                        "or: agent FOLDER ...")
    parser.add_argument("--out", help="where results.json and results.svg go (default: the first folder)")
    args = parser.parse_args(argv)
    if args.runs[0] == "sweep":
        return sweep(args.runs[1:])
    if args.runs[0] == "agent":
        return agent_report(args.runs[1:], args.out or args.runs[1])
    report(args.runs, args.out or args.runs[0])


if __name__ == "__main__":
    main()
