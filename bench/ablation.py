"""
Supplementary Tables 2 and 3 of the TWEO paper (the threshold τ at p = 4, the power p at τ = 3)
from train.py runs: PPL, Peak (largest |block output| during training) and Final (at the end).

    python bench/ablation.py out/mini_bf16 out/mini_bf16_tweo out/mini_bf16_tweo_tau1 ... [--json]

Rows are made from each run's run.json, never its directory name; runs that differ only in their
seed share a row (mean ± sample standard deviation, and how many seeds). The runs without TWEO are the
baseline rows (†); a TWEO run enters Table 2 if its p is 4 and Table 3 if its τ is 3 (the paper's
setting, #, is in both). Runs of different sizes, data or schedules get rows of their own, in the
order given. λ, the schedule and the precision are shown, not assumed.
"""
import json
import sys

from bench.runs import PAPER_TWEO, experiments, fmt_mean_sd, markdown, mean_sd, model_name, parse_args, peak_spec

USAGE = "python bench/ablation.py RUN_DIR [RUN_DIR ...] [--json]"
TABLES = (("Table 2: the threshold τ at p = 4", "τ", "tweo_tau", ("tweo_p", 4.0)),
          ("Table 3: the power p at τ = 3", "p", "tweo_p", ("tweo_tau", 3.0)))


def table_rows(summaries, varied, fixed):
    """(runs of one experiment, the value of the varied setting or None for a baseline), baselines
    first; the runs are the experiment's seeds (bench/runs.py experiments)."""
    fixed_key, fixed_value = fixed
    groups = experiments(summaries)
    base = [g for g in groups if g[0]["config"]["tweo_lambda"] <= 0]
    tweo = [g for g in groups if g[0]["config"]["tweo_lambda"] > 0 and g[0]["config"][fixed_key] == fixed_value]
    return [(g, None) for g in base] + sorted(((g, g[0]["config"][varied]) for g in tweo), key=lambda r: r[1])


def status(s):
    """What the PPL cell must say beside the number: a collapse (its PPL is the best evaluation
    before it, '-' if there was none) or a run still under way."""
    if s["collapse_iter"] is not None:
        return f" (collapsed at iter {s['collapse_iter']}" + (f"; best before, iter {s['ppl_iter']})" if s["ppl"] else ")")
    return "" if s["finished"] else f" (unfinished: iter {s['last_iter']} of {s['max_iters']})"


def statuses(runs):
    """status() of one run; of several seeds, how many collapsed or are unfinished."""
    if len(runs) == 1:
        return status(runs[0])
    collapsed = [s["collapse_iter"] for s in runs if s["collapse_iter"] is not None]
    unfinished = [s for s in runs if s["collapse_iter"] is None and not s["finished"]]
    parts = ([f"{len(collapsed)} of {len(runs)} collapsed, at iter {', '.join(map(str, collapsed))}; "
              f"their best evaluations before"] if collapsed else []) + \
        ([f"{len(unfinished)} of {len(runs)} unfinished"] if unfinished else [])
    return f" ({'; '.join(parts)})" if parts else ""


def describe(s):
    c = s["config"]
    mode = s["precision"].upper()
    if c["tweo_lambda"] > 0:
        mode += f", λ={c['tweo_lambda']:g}" + (f" {c['tweo_schedule']}" if c["tweo_schedule"] != "constant" else "")
    return f"{model_name(s)}{' ' + s['variant'] + ' *' if s['variant'] else ''} ({mode})"


def main(argv):
    summaries, opts = parse_args(argv, {"json": False}, USAGE)
    result = {}
    seeds = sorted({s["config"]["seed"] for s in summaries})
    for title, symbol, varied, fixed in TABLES:
        rows, out = [], []
        for runs, value in table_rows(summaries, varied, fixed):
            s = runs[0]
            paper = value is not None and all(s["config"][k] == v for k, v in PAPER_TWEO.items() if k != "tweo_lambda")
            label = "–" if value is None else f"{value:g}"
            ppl, peak, final = ([r[k] for r in runs] for k in ("ppl", "peak", "final_act"))
            rows.append([describe(s) + (" †" if value is None else " #" if paper else ""), label,
                         fmt_mean_sd(ppl, ".2f") + statuses(runs), len(runs),
                         fmt_mean_sd(peak, peak_spec(peak)), fmt_mean_sd(final, peak_spec(final))])
            out.append({"runs": [r["out_dir"] for r in runs], "seeds": [r["config"]["seed"] for r in runs], symbol: value,
                        **{k: dict(zip(("mean", "sd"), mean_sd(v))) for k, v in (("ppl", ppl), ("peak", peak), ("final", final))},
                        "finished": [r["finished"] for r in runs], "collapse_iter": [r["collapse_iter"] for r in runs]})
        print(f"\n{title}\n")
        print(markdown(["Model", symbol, "PPL ↓", "Seeds", "Peak", "Final"], rows))
        result[varied] = out
    if len(seeds) > 1:
        print(f"\nA row of several seeds ({', '.join(map(str, seeds))}): mean ± sample standard deviation.")
    print("\n†: trained without TWEO. #: the paper's setting (τ = 3, p = 4). PPL: validation perplexity at the "
          "end of training (of a collapsed run: its best evaluation before the collapse). Peak: the largest |block output| during training; Final: at the last logged iteration.")
    if opts["json"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
