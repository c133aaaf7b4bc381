"""
Table 2 of the TWEO paper (FP8 pre-training: PPL in FP8 and BF16, and the activation Peak)
from train.py runs, in the paper's layout.

    python bench/table2.py out/gpt2_xl_bf16 out/gpt2_xl_fp8 out/gpt2_xl_bf16_tweo out/gpt2_xl_fp8_tweo [--paper] [--json]

Runs are put into rows by their run.json, never by directory name: one row per model size,
data and schedule (bench/runs.py group_key) and method (baseline, +TWEO, an invasive variant);
the FP8 run of a row fills "PPL (FP8)", the BF16 run "PPL (BF16)". Runs that differ only in
their seed are repeats: their cell is the mean ± sample standard deviation, and a second table
gives each cell's paired gaps to the BF16 baseline of the same seed. Any other difference within
a cell stops with one line. Peak is the largest |block output| logged by any run of the row. A collapsed run reports its best checkpoint
before the collapse, marked #, with the iteration in a footnote. --paper adds the paper's
own numbers for the sizes it has; --json prints the rows as JSON on the last line.
"""
import json
import sys

from bench.runs import (SCHEDULE_KEYS, SIZE_KEYS, check_repeats, fmt, fmt_mean_sd, markdown, mean_sd, order_key,
                        parse_args, peak_spec, row_name)
from configurator import fail

USAGE = "python bench/table2.py RUN_DIR [RUN_DIR ...] [--paper] [--json]"
# Table 2 of the paper: (PPL (FP8), PPL (BF16), Peak); None where it prints '-'. The paper
# marks the BF16 PPL of GPT2-medium and GPT2-large '#' ("Training collapsed. We report the
# best checkpoint before collapsing."). Its row "Attn ca-softmax *" (124M: 23.81, 19.34, 135)
# is a learnable context-dependent softmax scale, which this repository does not have.
PAPER = {
    ("gpt2_124m", "", ""): (169.81, 20.04, 823),
    ("gpt2_124m", "attn bias", ""): (24.93, 19.79, 163),
    ("gpt2_124m", "", "+TWEO"): (19.26, 18.68, 17),
    ("gpt2_medium", "", ""): (127.34, 16.77, 24563),
    ("gpt2_medium", "", "+TWEO"): (15.64, 15.18, 19),
    ("gpt2_large", "", ""): (178.66, 14.78, 32361),
    ("gpt2_large", "", "+TWEO"): (13.89, 13.79, 18),
    ("gpt2_xl", "", ""): (93.28, 13.84, 32889),
    ("gpt2_xl", "", "+TWEO"): (12.58, 12.39, 19),
    ("gpt2_3b", "", ""): (76.85, None, None),
    ("gpt2_3b", "", "+TWEO"): (12.24, None, 18),
    ("gpt2_7b", "", ""): (67.12, None, None),
    ("gpt2_7b", "", "+TWEO"): (12.02, None, 20),
}
PAPER_COLLAPSED_BF16 = {"gpt2_medium", "gpt2_large"}


def build_rows(summaries):
    """Table rows: dicts with the JSON keys, plus the runs' summaries (a list per precision, one
    run per seed) under 'by_precision'."""
    rows = {}
    for s in sorted(summaries, key=order_key):
        row = rows.setdefault((s["group"], s["row"]), {"model": row_name(s), "params": s["params_str"],
                                                       "by_precision": {}, "first": s})
        row["by_precision"].setdefault(s["precision"], []).append(s)
    for row in rows.values():
        for precision, runs in row["by_precision"].items():
            check_repeats(runs, f"{precision.upper()} run of row '{row['model']}' (same size, data, schedule and method)")
            runs.sort(key=lambda s: s["config"]["seed"])
    names = {key: row["model"] + distinction(row["first"], [r["first"] for r in rows.values() if r["model"] == row["model"]])
             for key, row in rows.items()}
    out = []
    for key, row in rows.items():
        row["model"] = names[key]
        fp8, bf16 = row["by_precision"].get("fp8", []), row["by_precision"].get("bf16", [])
        peaks = [s["peak"] for s in fp8 + bf16 if s["peak"] is not None]
        collapses = [s["collapse_iter"] for s in fp8 if s["collapse_iter"] is not None]
        (ppl_fp8, ppl_fp8_sd), (ppl_bf16, ppl_bf16_sd) = (mean_sd([s["ppl"] for s in runs]) for runs in (fp8, bf16))
        out.append({"model": row["model"], "params": row["params"], "ppl_fp8": ppl_fp8, "ppl_bf16": ppl_bf16,
                    "ppl_fp8_sd": ppl_fp8_sd, "ppl_bf16_sd": ppl_bf16_sd,
                    "seeds_fp8": [s["config"]["seed"] for s in fp8], "seeds_bf16": [s["config"]["seed"] for s in bf16],
                    "peak": max(peaks) if peaks else None,
                    "collapsed": bool(collapses), "collapse_iter": collapses[0] if collapses else None,
                    "runs": [s["out_dir"] for s in fp8 + bf16],
                    "by_precision": row["by_precision"], "first": row["first"]})
    return out


def distinction(s, namesakes):
    """' (max_iters=30)': what sets a row apart from rows of the same name (another shape, data or schedule)."""
    keys = SIZE_KEYS + ("data_dir",) + SCHEDULE_KEYS
    differ = [k for k in keys if len({str(o["config"][k]) for o in namesakes}) > 1]
    config = s["config"]
    return " (" + ", ".join(f"{k}={config[k]}" for k in differ) + ")" if differ else ""


def paper_numbers(row):
    s = row["first"]
    numbers = PAPER.get((s["size"], s["variant"], s["tweo"]))
    if numbers is None:
        return None
    return dict(zip(("ppl_fp8", "ppl_bf16", "peak"), numbers))


def cell(runs, notes):
    """A PPL cell: '-' without a run, the mean ± sd of several seeds, '#' for a collapsed run,
    '†' for one that has not finished."""
    if not any(s["ppl"] is not None for s in runs):
        return "-"
    text = fmt_mean_sd([s["ppl"] for s in runs], ".2f")
    marks = ""
    for summary in runs:
        if summary["collapse_iter"] is not None:
            notes.append(f"#: {summary['out_dir']}: training collapsed at iter {summary['collapse_iter']}; "
                         f"we report the best checkpoint before collapsing (iter {summary['ppl_iter']}).")
            marks += "" if "#" in marks else " #"
        elif not summary["finished"]:
            notes.append(f"†: {summary['out_dir']}: stopped at iter {summary['last_iter']} of {summary['max_iters']} "
                         f"without a collapse; its last evaluation (iter {summary['ppl_iter']}).")
            marks += "" if "†" in marks else " †"
    return text + marks


def paired_gaps(rows):
    """Per seed, each cell's PPL against the BF16 baseline of its size, data and schedule with the
    same seed (only seeds both have), in percent: into each row as gap_pct_fp8 / gap_pct_bf16,
    [[seed, gap], ...]; returns the lines of the gaps table."""
    baselines = {r["first"]["group"]: r for r in rows if not r["first"]["variant"] and not r["first"]["tweo"]}
    lines = []
    for row in rows:
        base = baselines.get(row["first"]["group"])
        if base is None:
            continue
        base_ppl = {s["config"]["seed"]: s["ppl"] for s in base["by_precision"].get("bf16", []) if s["ppl"] is not None}
        for precision in ("fp8", "bf16"):
            runs = [s for s in row["by_precision"].get(precision, []) if s["ppl"] is not None]
            gaps = [[s["config"]["seed"], 100 * (s["ppl"] / base_ppl[s["config"]["seed"]] - 1)]
                    for s in runs if s["config"]["seed"] in base_ppl]
            if not gaps or (row is base and precision == "bf16"):
                continue
            row[f"gap_pct_{precision}"] = gaps
            lines.append([row["model"], precision.upper(), len(gaps), fmt_mean_sd([g for _, g in gaps], "+.1f") + "%",
                          ", ".join(f"{g:+.1f}% ({seed})" for seed, g in gaps),
                          fmt_mean_sd([s["peak"] for s in runs], peak_spec([s["peak"] for s in runs]))])
    return lines


def format_peak(v):
    return fmt(v, peak_spec([v]))


def main(argv):
    summaries, opts = parse_args(argv, {"paper": False, "json": False}, USAGE)
    try:
        rows = build_rows(summaries)
    except ValueError as e:
        fail(str(e))
    header = ["Model", "Params", "PPL (FP8) ↓", "PPL (BF16) ↓", "Peak"]
    if opts["paper"]:
        header += ["paper PPL (FP8)", "paper PPL (BF16)", "paper Peak"]
    lines, notes = [], []
    for row in rows:
        line = [row["model"], row["params"], cell(row["by_precision"].get("fp8", []), notes),
                cell(row["by_precision"].get("bf16", []), notes), format_peak(row["peak"])]
        if opts["paper"]:
            p = paper_numbers(row)
            row["paper"] = p
            line += ["", "", ""] if p is None else [
                fmt(p["ppl_fp8"], ".2f"),
                fmt(p["ppl_bf16"], ".2f") + (" #" if row["first"]["size"] in PAPER_COLLAPSED_BF16 and not row["first"]["tweo"] else ""),
                fmt(p["peak"], ".0f")]
        lines.append(line)
    print(markdown(header, lines))
    if any(r["first"]["variant"] for r in rows):
        notes.insert(0, "*: invasive methods (a change to the architecture).")
    notes.append("PPL: validation perplexity. Peak: largest |block output| during training, over the row's runs.")
    if opts["paper"]:
        notes.append("paper: Table 2 of the TWEO paper (GPT-2 on OpenWebText, 100k steps) for the sizes it has; "
                     "its # marks a collapsed run too.")
    seeds = sorted({seed for r in rows for seed in r["seeds_fp8"] + r["seeds_bf16"]})
    if any(len(r["seeds_fp8"]) > 1 or len(r["seeds_bf16"]) > 1 for r in rows):
        notes.append(f"A cell of several runs (seeds {', '.join(map(str, seeds))}): mean ± sample standard deviation "
                     f"over its seeds.")
    print("\n" + "\n".join(notes))
    gap_lines = paired_gaps(rows)
    if len(seeds) > 1 and gap_lines:
        print("\nPaired gaps: each run's PPL against the BF16 baseline's run with the same seed (PPL / PPL_BF16 - 1)\n")
        print(markdown(["Model", "Precision", "Seeds", "Gap (mean ± sd)", "Per seed", "Peak (mean ± sd)"], gap_lines))
    result = [{k: v for k, v in r.items() if k not in ("by_precision", "first")} for r in rows]
    if opts["json"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
