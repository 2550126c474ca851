"""
The built-in demo's table, in the shape of the paper's: test accuracy per method, as text, JSON and an SVG chart.

    python report.py out/demo                           # one run: OUT/results.json, OUT/results.svg
    python report.py out/demo-s0 out/demo-s1 out/demo-s2 --out out/summary   # mean ± std over seeds
    python report.py sweep out/demo                     # the learning-rate sweep on the validation problems
    python report.py sweep out/agent                    # ... and the agent demo's (bash train.sh agent-sweep)
    python report.py agent out/agent [out/agent-s1 ...]  # the agent demo: success on the seen and unseen tasks

Reads the search.py eval files that train.sh writes under OUT/eval/ (and OUT/sweep/ for the sweep), and
diagnose.py's OUT/diagnostics.json when there is one: its numbers join the table (shares also the chart), and
the value paths of the first folder go into value_paths.svg.
"""
import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

from files import write_atomic

# (row label, eval file under OUT/eval, method in that file, group); {B}, {K}, {R} stand for any beam width,
# best-of-K size and iteration round found in the files. A label ending in "(beam problems)" is the same method
# counted only on the problems the beam search was run on (train.sh runs it on a subset to stay within minutes).
ROWS = [
    ("SFT greedy", "sft", "greedy", "baseline"),
    ("SFT sampling (T = 1)", "sft", "sample", "baseline"),
    ("RS greedy", "rs", "greedy", "baseline"),
    ("DPO greedy", "dpo", "greedy", "baseline"),
    ("KTO greedy", "kto", "greedy", "baseline"),
    ("OREO-token greedy", "oreo", "greedy", "oreo"),
    ("OREO-step greedy", "oreo_step", "greedy", "oreo"),
    ("RS round {R} greedy", "rs_r{R}", "greedy", "baseline"),
    ("OREO-token round {R} greedy", "oreo_r{R}", "greedy", "oreo"),
    ("OREO-token greedy (beam problems)", "oreo", "greedy", "search"),
    ("OREO + value beam B = {B}", "beam_oreo", "beam{B}", "search"),
    ("OREO-token round {R} greedy on the beam problems", "beam_oreo_r{R}", "greedy", "search"),
    ("OREO-token round {R} + value beam B = {B}", "beam_oreo_r{R}", "beam{B}", "search"),
    ("OREO-token tuned for search: greedy (beam problems)", "oreo_search", "greedy", "search"),
    ("OREO-token tuned for search + value beam B = {B}", "oreo_search", "beam{B}", "search"),
    ("SFT greedy (beam problems)", "sft", "greedy", "search"),
    ("SFT policy + OREO value beam B = {B}", "beam_sft", "beam{B}", "search"),
    ("SFT policy + random scores beam B = {B} (control)", "beam_sft", "randbeam{B}", "search"),
    ("1 of {K} SFT samples chosen by OREO value", "choice", "bestof{K}:by_value", "choice"),
    ("1 of {K} SFT samples chosen at random", "choice", "bestof{K}:random", "choice"),
    ("1 of {K} SFT samples: best possible", "choice", "bestof{K}:best_possible", "choice"),
]
# whose problems a "(beam problems)" row counts (oreo_search's own file holds only those problems)
BEAM_FILE = {"oreo": "beam_oreo", "sft": "beam_sft", "oreo_search": "oreo_search"}
COLORS = {"baseline": "#9e9e9e", "oreo": "#1f77b4", "search": "#2ca02c", "choice": "#ff7f0e",
          "diagnostic": "#9467bd"}


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
                rows[label.format(B=width, K=width, R=file.rpartition("_r")[2])] = (accuracy, n, group)
    return rows


# (row label, how to read it from diagnose.py's OUT/diagnostics.json, whether it is a share in 0..1 for the chart)
DIAGNOSTICS = [
    ("SFT loss on its demonstrations (nats/token)", lambda d: d["sft_loss"], False),
    ("the demonstrations' entropy floor (nats/token)", lambda d: d["entropy_floor"], False),
    ("SFT loss on fresh demonstrations of the validation problems", lambda d: d["sft_loss_val"], False),
    ("their entropy floor (nats/token)", lambda d: d["entropy_floor_val"], False),
    ("SFT samples: per-step accuracy", lambda d: d["sft_samples"]["step_accuracy"], True),
    ("SFT samples: correct", lambda d: d["sft_samples"]["correct"], True),
    ("SFT samples: reward-1 with a wrong step (lucky positives)", lambda d: d["sft_samples"]["lucky_positives"], True),
    ("one-wrong-step samples: mean change of OREO's V across the wrong step", lambda d: d["credit"]["dv_wrong"][0],
     False),
    ("one-wrong-step samples: mean change of OREO's V across a right step", lambda d: d["credit"]["dv_right"][0],
     False),
    ("one-wrong-step samples: the wrong step is V's largest drop", lambda d: d["credit"]["wrong_is_largest_drop"],
     True),
]


def read_diagnostics(out):
    """{label: (value, is a share)} from OUT/diagnostics.json; {} when diagnose.py has not run there."""
    path = Path(out, "diagnostics.json")
    if not path.exists():
        return {}
    d, rows = json.loads(path.read_text()), {}
    for label, get, share in DIAGNOSTICS:
        try:
            value = get(d)
        except KeyError:   # diagnose.py ran before OREO: no credit assignment
            continue
        if value is not None:
            rows[label] = (value, share)
    return rows


def svg_value_paths(paths, title):
    """OREO's value at the state before each line of a few samples with one wrong step (a red dot after it)."""
    left, top, width, height = 50, 40, 420, 220
    n = max(len(p["values"]) for p in paths)
    lo = min(min(min(p["values"]) for p in paths), 0.0)
    hi = max(max(max(p["values"]) for p in paths), lo + 1e-6)
    x = lambda k: left + width * k / max(n - 1, 1)
    y = lambda v: top + height * (hi - v) / (hi - lo)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 30}" height="{top + height + 50}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="10" y="22" font-size="14" font-weight="bold">{escape(title)}</text>',
             f'<line x1="{left}" y1="{y(0):.1f}" x2="{left + width}" y2="{y(0):.1f}" stroke="#bbb"/>',
             f'<text x="{left - 6}" y="{y(hi) + 4:.1f}" text-anchor="end">{hi:.2f}</text>',
             f'<text x="{left - 6}" y="{y(lo) + 4:.1f}" text-anchor="end">{lo:.2f}</text>']
    for k in range(n):
        parts.append(f'<text x="{x(k):.1f}" y="{top + height + 18}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{left + width / 2}" y="{top + height + 38}" text-anchor="middle">lines written '
                 f'(0: the prompt; red: after the wrong step)</text>')
    for p in paths:
        points = " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in enumerate(p["values"]))
        k = p["wrong_step"]
        parts += [f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>',
                  f'<circle cx="{x(k):.1f}" cy="{y(p["values"][k]):.1f}" r="4" fill="#d62728"/>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


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
    left, width, row_h, top = 420, 380, 24, 40
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
        n = f' (n={row["problems"]})' if row["problems"] else ""
        parts += [f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{escape(label)}{n}</text>',
                  f'<rect x="{left}" y="{y + 4}" width="{width * row["mean"]:.1f}" height="{row_h - 8}" '
                  f'fill="{COLORS[row["group"]]}"/>',
                  f'<line x1="{x(lo):.1f}" y1="{y + 12}" x2="{x(hi):.1f}" y2="{y + 12}" stroke="black"/>',
                  f'<text x="{x(hi) + 6:.1f}" y="{y + 16}">{row["mean"]:.3f}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt(row, digits=3):
    return f"{row['mean']:.{digits}f}" + (f" ± {row['std']:.{digits}f}" if len(row["seeds"]) > 1 else "")


def report(outs, dest):
    table = combine([read_run(o) for o in outs])
    diagnostics = combine([{label: (x, None, "diagnostic" if share else None)
                            for label, (x, share) in read_diagnostics(o).items()} for o in outs])
    n = len(outs)
    print(f"{'test accuracy' + (f' (mean ± std over {n} seeds)' if n > 1 else ''):<46} {'problems':>8}")
    for label, row in table.items():
        seeds = "  [" + " ".join(f"{x:.3f}" for x in row["seeds"]) + "]" if n > 1 else ""
        print(f"{label:<46} {row['problems']:8d}  {fmt(row)}{seeds}")
    if diagnostics:
        print("diagnostics (diagnose.py)")
    for label, row in diagnostics.items():
        seeds = "  [" + " ".join(f"{x:.4f}" for x in row["seeds"]) + "]" if n > 1 else ""
        print(f"{label:<72} {fmt(row, 4)}{seeds}")
    os.makedirs(dest, exist_ok=True)
    write(Path(dest, "results.json"), json.dumps({"runs": [str(o) for o in outs], "table": table,
                                                  "diagnostics": diagnostics}, indent=1))
    title = f"Built-in task: test accuracy ({n} seed{'s' if n > 1 else ''}" + (", mean ± std)" if n > 1 else ")")
    charted = {**table, **{label: row for label, row in diagnostics.items() if row["group"]}}
    write(Path(dest, "results.svg"), svg_chart(charted, title))
    written = ["results.json", "results.svg"]
    first = Path(outs[0], "diagnostics.json")
    if first.exists() and json.loads(first.read_text()).get("credit", {}).get("paths"):
        paths = json.loads(first.read_text())["credit"]["paths"]
        write(Path(dest, "value_paths.svg"), svg_value_paths(paths, f"OREO's value along {len(paths)} SFT samples "
                                                                    f"with one wrong step ({outs[0]})"))
        written.append("value_paths.svg")
    print(f"report.py: wrote " + ", ".join(f"{dest}/{name}" for name in written))


# the agent demo: (row label, eval file under OUT/eval, method in it, group), for each split
AGENT_ROWS = [("SFT", "sft", "greedy", "baseline"), ("RS", "rs", "greedy", "baseline"),
              ("DPO", "dpo", "greedy", "baseline"), ("OREO-token", "oreo", "greedy", "oreo"),
              ("OREO-step", "oreo_step", "greedy", "oreo"),
              ("OREO-token, sampling (T 1)", "oreo", "sample", "search"),
              ("OREO-token + best-of-{K}", "oreo", "bestof{K}", "search"),
              ("OREO-step, sampling (T 1)", "oreo_step", "sample", "search"),
              ("OREO-step + best-of-{K}", "oreo_step", "bestof{K}", "search"),
              ("OREO-token, sampling (T 0.5)", "oreo_t05", "sample", "search"),
              ("OREO-token + best-of-{K} (T 0.5)", "oreo_t05", "bestof{K}", "search")]


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
            summary = json.loads(path.read_text())["summary"]
            # search.py eval: greedy accuracy on the validation problems; agent.py eval: greedy success on val
            score = summary["greedy"]["accuracy"] if "greedy" in summary else summary["val"]["greedy"]["success"]
            acc.setdefault(method, {}).setdefault(lr, []).append(score)
        for path in sorted(Path(out, "sweep", "beam").glob("*.json")):   # OREO's runs searched with their value
            method, lr = path.stem.rsplit("-lr", 1)
            for key, row in json.loads(path.read_text())["summary"].items():
                acc.setdefault(f"{method}+{key}", {}).setdefault(lr, []).append(row["accuracy"])
    if not acc:
        sys.exit(f"report.py: no sweep results in {outs[0]}/sweep (run bash train.sh sweep first)")
    result = {"runs": [str(o) for o in outs], "validation_accuracy": {}, "best_lr": {}}
    lrs = sorted({lr for by_lr in acc.values() for lr in by_lr}, key=float)   # methods may have other grids
    width = max(map(len, acc)) + 1
    print(f"{'method':<{width}} " + "  ".join(f"lr {lr:>6}" for lr in lrs))
    for method, by_lr in acc.items():
        means = {lr: statistics.fmean(xs) for lr, xs in sorted(by_lr.items(), key=lambda kv: float(kv[0]))}
        result["validation_accuracy"][method] = means
        result["best_lr"][method] = max(means, key=lambda lr: (means[lr], -float(lr)))   # ties: the smaller rate
        print(f"{method:<{width}} " + "  ".join(f"{means[lr]:9.3f}" if lr in means else f"{'-':>9}" for lr in lrs) +
              f"   best {result['best_lr'][method]}")
    write(Path(outs[0], "sweep.json"), json.dumps(result, indent=1))
    print(f"report.py: wrote {outs[0]}/sweep.json")


def write(path, text):
    write_atomic(path, lambda f: f.write(text))   # a reader never sees half a file


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
