"""bench/runs.py: the one summary of a run, on hand-written logs with known answers."""
import json
import os

import pytest

from bench.runs import RunError, read_jsonl, summarize, train_flags
from conftest import eval_row, train_row, write_run


def test_a_finished_run_reports_its_last_evaluation_and_measured_times(tmp_path):
    rows = [train_row(5, 2.0, act_peak=3.0, mem_peak_gb=1.5), eval_row(10, 18.0), train_row(10, 2.0, act_peak=7.0),
            train_row(15, 4.0, act_peak=7.0, mem_peak_gb=2.5), eval_row(20, 20.0), train_row(20, 4.0, act_peak=7.0)]
    s = summarize(write_run(tmp_path / "a", rows, world_size=2))
    assert s["ppl"] == pytest.approx(20.0) and s["ppl_iter"] == 20 and s["finished"] and s["collapse_iter"] is None
    assert s["peak"] == 7.0 and s["vram_gb"] == 2.5
    # 5 iterations at 2 s, 5 at 2 s, 5 at 4 s, 5 at 4 s: 60 s for 20 iterations
    assert s["s_per_iter"] == pytest.approx(3.0) and s["iter_per_hour"] == pytest.approx(1200.0)
    # 20 iterations x 3 s x 2 GPUs = 120 GPU-seconds
    assert s["total_hours"] == pytest.approx(120 / 3600) and s["iters_timed"] == 20
    # wte 50304 x 64 (tied to the LM head) + wpe 64 x 64 + 2 blocks x 49984 + the final LayerNorm's 128
    assert s["params"] == 3_219_456 + 4_096 + 2 * 49_984 + 128 and s["params_str"] == "3.32M"
    assert s["mode"] == "BF16" and s["tweo"] == ""


def test_a_collapsed_run_reports_its_best_evaluation_before_the_collapse(tmp_path):
    rows = [eval_row(8, 30.0), eval_row(16, 25.0), eval_row(24, 40.0), {"iter": 29, "event": "collapse", "loss": "nan"},
            eval_row(32, 10.0)]  # after the collapse (stop_on_collapse=False): not reported
    s = summarize(write_run(tmp_path / "c", rows, precision="fp8", tweo_lambda=0.01, max_iters=40))
    assert s["ppl"] == pytest.approx(25.0) and s["ppl_iter"] == 16 and s["collapse_iter"] == 29
    assert not s["finished"] and s["mode"] == "FP8 +TWEO" and s["iter_per_hour"] is None


def test_a_resumed_run_counts_each_interval_once(tmp_path):
    # logged to iter 10, killed, resumed from the checkpoint of iter 8: the resumed process's
    # iter 10 (2 iterations at 5 s) replaces the first one's (5 iterations at 2 s)
    rows = [train_row(5, 2.0), train_row(10, 2.0), {"iter": 8, "event": "resume", "tag": "iter_0000008"},
            train_row(10, 5.0), train_row(15, 4.0), train_row(20, 4.0)]
    s = summarize(write_run(tmp_path / "r", rows))
    assert s["iters_timed"] == 17 and s["s_per_iter"] == pytest.approx((10 + 10 + 20 + 20) / 17)


def test_tweo_settings_other_than_the_papers_are_named(tmp_path):
    s = summarize(write_run(tmp_path / "t", [], tweo_lambda=0.01, tweo_tau=1.0, attn_bias=True))
    assert s["tweo"] == "+TWEO (tau=1)" and s["variant"] == "attn bias" and s["ppl"] is None


def test_train_flags_skip_finished_and_collapsed_runs_and_resume_the_rest(tmp_path):
    assert train_flags(str(tmp_path / "new"), 20) == []
    finished = write_run(tmp_path / "f", [train_row(20, 1.0)])
    assert train_flags(finished, 20) == ["--init_from=resume"]  # no model_last.pt: the final save did not happen
    open(os.path.join(finished, "model_last.pt"), "w").close()
    assert train_flags(finished, 20) is None and train_flags(finished, 40) == ["--init_from=resume"]
    collapse = {"iter": 7, "event": "collapse", "loss": 30.0}
    assert train_flags(write_run(tmp_path / "c", [train_row(5, 1.0), collapse]), 20) is None
    assert train_flags(write_run(tmp_path / "k", [train_row(5, 1.0), collapse], stop_on_collapse=False), 20) == ["--init_from=resume"]
    assert train_flags(write_run(tmp_path / "p", [train_row(10, 1.0)]), 20) == ["--init_from=resume"]


def test_mfu_is_the_median_over_log_lines_and_final_act_the_last_lines_largest_layer(tmp_path):
    rows = [dict(train_row(5, 2.0, act_peak=9.0), mfu=0.30), dict(train_row(10, 2.0, act_peak=9.0), mfu=0.10),
            dict(train_row(15, 2.0, act_peak=9.0), mfu=0.50), train_row(20, 2.0, act_peak=4.0)]  # the last without mfu
    s = summarize(write_run(tmp_path / "m", rows))
    assert s["mfu"] == pytest.approx(0.30)  # median of 0.30, 0.10, 0.50
    s = summarize(write_run(tmp_path / "n", rows + [dict(train_row(25, 2.0), mfu=0.95)], max_iters=25))
    assert s["mfu"] == pytest.approx((0.30 + 0.50) / 2)  # median of four; the mean would be 0.4625
    # train_row's act_max_per_layer is [peak / 2, peak]: the last line's peak 1.0, the run's 9.0
    assert s["final_act"] == 1.0 and s["peak"] == 9.0
    # 1024 tokens per step (write_run's total_batch_tokens) at 2 s per iteration
    assert s["tokens_per_sec"] == pytest.approx(512.0) and s["mfu"] is not None
    assert summarize(write_run(tmp_path / "o", [train_row(5, 2.0)]))["mfu"] is None  # no GPU peak known: no MFU


def test_a_last_line_cut_short_is_left_out_with_one_note_and_a_bad_line_elsewhere_is_named(tmp_path, capsys):
    rows = [train_row(1, 1.0), eval_row(1, 100.0), train_row(2, 1.0)]
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(whole + json.dumps(train_row(3, 1.0))[:25])  # a run killed while writing iter 3
    assert read_jsonl(str(path)) == rows
    assert capsys.readouterr().err == f"note: {path}: the last line is cut short (a run killed while writing it); read without it\n"
    path.write_text(whole)
    assert read_jsonl(str(path)) == rows and capsys.readouterr().err == ""
    lines = whole.splitlines(True)
    for broken in (1, 2):  # a cut line that a later line follows, and a last line that did end
        path.write_text("".join(lines[:broken]) + lines[broken][:25] + "\n" + "".join(lines[broken + 1:]))
        with pytest.raises(RunError, match=f"^{path}:{broken + 1} is not a JSON line "):
            read_jsonl(str(path))
