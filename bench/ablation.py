"""
Supplementary Tables 2 and 3 of the TWEO paper (the threshold τ at p = 4, the power p at τ = 3)
from train.py runs: PPL, Peak (largest |block output| during training) and Final (at the end).

    python bench/ablation.py out/mini_bf16 out/mini_bf16_tweo out/mini_bf16_tweo_tau1 ... [--json]

Rows are made from each run's run.json, never its directory name. The runs without TWEO are the
baseline rows (†); a TWEO run enters Table 2 if its p is 4 and Table 3 if its τ is 3 (the paper's
setting, #, is in both). Runs of different sizes, data or schedules get rows of their own, in the
order given. λ, the schedule and the precision are shown, not assumed.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.runs import PAPER_TWEO, fmt, markdown, model_name, parse_args  # noqa: E402
from bench.table2 import format_peak  # noqa: E402

USAGE = "python bench/ablation.py RUN_DIR [RUN_DIR ...] [--json]"
TABLES = (("Table 2: the threshold τ at p = 4", "τ", "tweo_tau", ("tweo_p", 4.0)),
          ("Table 3: the power p at τ = 3", "p", "tweo_p", ("tweo_tau", 3.0)))


def table_rows(summaries, varied, fixed):
    """(label, value of the varied setting or None for a baseline, summary), baselines first."""
    fixed_key, fixed_value = fixed
    base = [s for s in summaries if s["config"]["tweo_lambda"] <= 0]
    tweo = [s for s in summaries if s["config"]["tweo_lambda"] > 0 and s["config"][fixed_key] == fixed_value]
    return [(s, None) for s in base] + sorted(((s, s["config"][varied]) for s in tweo), key=lambda r: r[1])


def status(s):
    """What the PPL cell must say beside the number: a collapse (its PPL is the best evaluation
    before it, '-' if there was none) or a run still under way."""
    if s["collapse_iter"] is not None:
        return f" (collapsed at iter {s['collapse_iter']}" + (f"; best before, iter {s['ppl_iter']})" if s["ppl"] else ")")
    return "" if s["finished"] else f" (unfinished: iter {s['last_iter']} of {s['max_iters']})"


def describe(s):
    c = s["config"]
    mode = s["precision"].upper()
    if c["tweo_lambda"] > 0:
        mode += f", λ={c['tweo_lambda']:g}" + (f" {c['tweo_schedule']}" if c["tweo_schedule"] != "constant" else "")
    return f"{model_name(s)}{' ' + s['variant'] + ' *' if s['variant'] else ''} ({mode})"


def main(argv):
    summaries, opts = parse_args(argv, {"json": False}, USAGE)
    result = {}
    for title, symbol, varied, fixed in TABLES:
        rows, out = [], []
        for s, value in table_rows(summaries, varied, fixed):
            paper = value is not None and all(s["config"][k] == v for k, v in PAPER_TWEO.items() if k != "tweo_lambda")
            label = "–" if value is None else f"{value:g}"
            rows.append([describe(s) + (" †" if value is None else " #" if paper else ""), label,
                         fmt(s["ppl"], ".2f") + status(s),
                         format_peak(s["peak"]), format_peak(s["final_act"])])
            out.append({"run": s["out_dir"], symbol: value, "ppl": s["ppl"], "peak": s["peak"], "final": s["final_act"],
                        "finished": s["finished"], "collapse_iter": s["collapse_iter"]})
        print(f"\n{title}\n")
        print(markdown(["Model", symbol, "PPL ↓", "Peak", "Final"], rows))
        result[varied] = out
    print("\n†: trained without TWEO. #: the paper's setting (τ = 3, p = 4). PPL: validation perplexity at the "
          "end of training (of a collapsed run: its best evaluation before the collapse). Peak: the largest |block output| during training; Final: at the last logged iteration.")
    if opts["json"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
