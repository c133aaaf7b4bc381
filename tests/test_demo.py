"""bench/demo.py: one place for the demo's length, and a trained demo never continued under another schedule."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import demo
from conftest import REPO, eval_row, train_row, write_run


def run_demo(*args):
    return subprocess.run([sys.executable, "bench/demo.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def hand_made_demo(root, max_iters, finished):
    """OUT/demo_ITERS/<mode> as a demo of max_iters iterations would leave it, stopped at
    iteration 10 unless finished."""
    last = max_iters if finished else 10
    for mode in demo.MODES:
        out_dir = write_run(root / mode, [train_row(last, 1.0), eval_row(last, 30.0)], max_iters=max_iters,
                            lr_decay_iters=max_iters)
        if finished:
            open(os.path.join(out_dir, "model_last.pt"), "wb").close()


def snapshot(root):
    return {p: open(os.path.join(d, p), "rb").read() for d, _, files in os.walk(root) for p in files}


def test_the_schedule_is_derived_from_max_iters():
    assert demo.MAX_ITERS == 150
    assert demo.schedule(150) == {"max_iters": 150, "lr_decay_iters": 150, "eval_interval": 30, "ckpt_interval": 30,
                                  "act_stats_interval": 30, "log_interval": 5}


@pytest.mark.parametrize("finished", [True, False])
def test_a_run_of_another_schedule_is_refused_before_any_training(tmp_path, finished):
    # a 150-iteration demo where --max_iters=400 looks for its runs (e.g. moved by hand)
    hand_made_demo(tmp_path / "demo_400", 150, finished)
    before = snapshot(tmp_path)
    r = run_demo("--max_iters=400", f"--out={tmp_path}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0] == (f"error: {tmp_path}/demo_400/bf16 holds a run trained with max_iters=150 (now 400), "
                        f"lr_decay_iters=150 (now 400): continuing it would change its learning rate schedule; "
                        f"move {tmp_path}/demo_400/bf16 away to train it again")
    assert snapshot(tmp_path) == before  # nothing written


def test_runs_of_the_same_schedule_and_no_runs_are_fine(tmp_path):
    flags = demo.schedule(400)
    hand_made_demo(tmp_path / "same", 400, finished=False)
    assert demo.schedule_conflict(str(tmp_path / "same" / "bf16"), flags) is None  # resumed by train_flags
    assert demo.schedule_conflict(str(tmp_path / "nothing"), flags) is None
    hand_made_demo(tmp_path / "other", 400, finished=True)
    with open(tmp_path / "other" / "fp8" / "run.json", "w") as f:
        json.dump({"config": {"max_iters": 400, "lr_decay_iters": 150}}, f)
    assert "lr_decay_iters=150 (now 400)" in demo.schedule_conflict(str(tmp_path / "other" / "fp8"), flags)


def test_too_few_iterations_is_bad_input(tmp_path):
    r = run_demo("--max_iters=4", f"--out={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip() == "error: max_iters=4 must be >= 5 (evaluations every max_iters // 5 iterations)"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_leaves_the_default_length_to_demo_py():
    def demo_line(*args):
        r = subprocess.run(["make", "-n", "demo", *args], cwd=REPO, capture_output=True, text=True)
        return next(line for line in r.stdout.splitlines() if "bench/demo.py" in line)
    assert "--max_iters" not in demo_line() and demo_line("DEMO_ITERS=400").endswith("bench/demo.py --max_iters=400")
