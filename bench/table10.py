"""
Table 10 of the TWEO supplementary (training cost) from train.py runs' own logs: peak memory,
total time for max_iters and iterations per hour, against the Default (BF16) run of the same
size, data and schedule.

    python bench/table10.py out/gpt2_xl_bf16 out/gpt2_xl_bf16_tweo out/gpt2_xl_fp8_tweo [--json]

Total Time (H) is GPU-hours, as in the paper (its GPT-2 XL: 100k iterations at 661 iter/H on
8 GPUs = 1210 H): the measured seconds per iteration (all logged intervals, evaluations and
checkpoints included) x max_iters x GPUs. VRAM is the largest peak of rank 0 (CUDA: allocated
memory; CPU: the process's peak RSS). For the four modes side by side on one model, without
the engine, see bench/throughput.py.
"""
import json
import sys

from bench.runs import fmt, markdown, model_name, order_key, parse_args

USAGE = "python bench/table10.py RUN_DIR [RUN_DIR ...] [--json]"


def method(s):
    """The paper's method names: Default (BF16), TWEO (BF16+TWEO), FP8; ours add FP8+TWEO."""
    name = {("bf16", False): "Default", ("bf16", True): "TWEO", ("fp8", False): "FP8",
            ("fp8", True): "FP8+TWEO"}[(s["precision"], bool(s["tweo"]))]
    extra = s["tweo"].removeprefix("+TWEO").strip()
    return " ".join(p for p in (s["variant"] and s["variant"] + " *", name, extra) if p)


def relative(v, base):
    return f" ({100 * (v / base - 1):+.0f}%)" if v is not None and base else ""


def main(argv):
    summaries, opts = parse_args(argv, {"json": False}, USAGE)
    rows, lines = [], []
    for s in sorted(summaries, key=lambda s: (order_key(s), s["precision"] == "fp8")):
        default = next((d for d in summaries if d["group"] == s["group"] and d["precision"] == "bf16"
                        and not d["tweo"] and not d["variant"]), None)
        row = {"model": model_name(s), "params": s["params_str"], "method": method(s), "vram_gb": s["vram_gb"],
               "total_hours": s["total_hours"], "iter_per_hour": s["iter_per_hour"],
               "total_vs_default": s["total_hours"] / default["total_hours"] - 1 if default and s["total_hours"] and default["total_hours"] else None,
               "iter_per_hour_vs_default": s["iter_per_hour"] / default["iter_per_hour"] - 1 if default and s["iter_per_hour"] and default["iter_per_hour"] else None,
               "gpus": s["world_size"], "iters_timed": s["iters_timed"], "max_iters": s["max_iters"], "run": s["out_dir"]}
        rows.append(row)
        base = default if default is not s else None  # the paper prints no percentage on the Default row
        lines.append([f"{row['model']} ({row['params']})", row["method"], fmt(row["vram_gb"], ".2f"),
                      fmt(row["total_hours"], ".3g") + relative(row["total_hours"], base and base["total_hours"]),
                      fmt(row["iter_per_hour"], ".0f") + relative(row["iter_per_hour"], base and base["iter_per_hour"]),
                      row["gpus"], f"{row['iters_timed']} of {row['max_iters']}"])
    print(markdown(["Model", "Method", "VRAM (GB)", "Total Time (H)", "iter/H", "GPUs", "iters measured"], lines))
    print("\nTotal Time (H): GPU-hours for max_iters, extrapolated from the measured time per iteration. "
          "(+x%): against the Default (BF16) run of the same size, data and schedule.")
    if opts["json"]:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
