"""bench/gpu_check.py: its logic on CPU (tiny config, two steps): it trains through train.py,
resumes a copy from the middle checkpoint, checks, and prints Table 10's columns; and what
fails a check (train.py stood in for)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench.gpu_check as gpu_check_module
import precision
from bench.gpu_check import check, main as gpu_check, verdict
from conftest import REPO, refused, train_row, write_run


def test_gpu_check_runs_its_checks_and_prints_table_10(demo_data, tmp_path):
    out_dir = tmp_path / "check"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--config=configs/tiny.py", "--max_iters=2",
                        "--compile=False",  # for train.py: the check's logic, not inductor's, is under test
                        f"--data_dir={demo_data}", f"--out_dir={out_dir}"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "Transformer Engine not checked" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("mode"))
    assert lines[header].split() == ["mode", "iter/h", "vs", "bf16", "tokens/s", "MFU", "mem", "GB", "vs", "bf16",
                                     "loss", "resume", "ops/mb", "syncs/mb"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 3]}
    assert set(rows) == {"bf16", "torch"} and rows["bf16"][2] == "1.00x" and rows["bf16"][6] == "1.00x"
    assert float(rows["torch"][-3]) < 1e-2 and float(rows["bf16"][-3]) < 1e-2  # resumed runs reproduce the loss
    # the torch backend's micro-batch: more ops than BF16's (the casts, the scale bookkeeping), no host sync
    assert int(rows["torch"][-2]) > int(rows["bf16"][-2]) > 0 and rows["torch"][-1] == rows["bf16"][-1] == "0"
    for mode, row in rows.items():  # the steady-state time: here the one iteration after the first
        timed = [json.loads(line) for line in open(out_dir / mode / "metrics.jsonl")]
        s_per_iter = next(r["iter_time_s"] for r in timed if r.get("iter") == 2 and "iter_time_s" in r)
        assert int(row[1]) == round(3600 / s_per_iter)
    assert "tokens/s, not MFU, compares the modes" in r.stdout
    assert lines[-1] == "all checks passed"
    assert (out_dir / "torch_resumed" / "ckpt" / "iter_0000002").is_dir()
    r = subprocess.run([sys.executable, "bench/gpu_check.py", f"--out_dir={out_dir}"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "exists" in r.stderr  # never writes into an existing directory


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses_unless_asked_to_run_on_the_cpu(tmp_path, capsys):
    err = refused(capsys, gpu_check, f"--out_dir={tmp_path / 'check'}")
    assert err.startswith("error: no CUDA GPU here (torch.cuda.is_available() is False): this checks a GPU install; "
                          "--cpu runs the check on the CPU anyway") and not (tmp_path / "check").exists()
    err = refused(capsys, gpu_check, "--loss_rtol=abc", f"--out_dir={tmp_path / 'check'}")
    assert err == "error: '--loss_rtol=abc': cannot read 'abc' as a float\n"


def test_checks_beyond_their_tolerance_print_failed_lines_and_exit_1(capsys):
    """check() on made-up results: torch's loss 6% from BF16's and its resumed loss 2e-2 from its
    own fail; te's, 4% and 9e-3, are within 5% and 1e-2 (relative to BF16's loss, not absolute)."""
    results = {"bf16": dict(final_loss=4.0, resume_diff=0.0), "torch": dict(final_loss=4.24, resume_diff=0.02),
               "te": dict(final_loss=4.16, resume_diff=0.009)}
    failures = check(results, loss_rtol=0.05, resume_rtol=1e-2)
    assert failures == ["torch: resumed loss differs by 2.0e-02 > 0.01", "torch: loss 4.2400 vs bf16 4.0000 (> 5% apart)"]
    assert verdict(failures) == 1
    assert capsys.readouterr().out.splitlines() == ["FAILED " + f for f in failures] + ["2 check(s) failed"]
    assert check(results, loss_rtol=0.07, resume_rtol=0.03) == [] and verdict([]) == 0
    assert capsys.readouterr().out == "all checks passed\n"


def test_a_train_py_failure_is_a_failed_check(tmp_path, monkeypatch, capsys):
    """main, train.py stood in for: BF16 trains but its resume fails, torch's run fails at once.
    Both are FAILED lines, and the exit status is 1, with no training run at all."""
    calls = []

    def train(out_dir, args):
        calls.append(os.path.basename(out_dir))
        if calls[-1] == "bf16":
            os.makedirs(os.path.join(out_dir, "ckpt"))  # what the resumed copy is made of
            return 0
        return 1
    monkeypatch.setattr(gpu_check_module, "train", train)
    monkeypatch.setattr(precision, "te_available", lambda: (False, "not installed here"))
    status = gpu_check(["--cpu", f"--out_dir={tmp_path / 'check'}", f"--data_dir={tmp_path / 'unused'}"])
    out = capsys.readouterr().out.splitlines()
    assert status == 1 and calls == ["bf16", "bf16_resumed", "torch"]
    assert out[-3:] == ["FAILED bf16: resume failed", "FAILED torch: train.py failed", "2 check(s) failed"]
    assert (tmp_path / "check" / "bf16_resumed" / "ckpt" / "latest").read_text() == "iter_0000025"


def test_losses_apart_and_a_resume_that_differs_fail_through_main(tmp_path, monkeypatch, capsys):
    """main, train.py stood in for by hand-written runs of 10 iterations (losses 5 - 0.1 i): torch's
    losses are BF16's x1.06 and its resumed run ends 2% off; BF16's resume reproduces its run. The
    table's loss and resume columns, the FAILED lines and the exit status, against those numbers."""
    scale = {"bf16": 1.0, "torch": 1.06}

    def train(out_dir, args):
        mode = os.path.basename(out_dir).removesuffix("_resumed")
        loss = lambda i: (5 - 0.1 * i) * scale[mode]  # noqa: E731
        if out_dir.endswith("_resumed"):  # the copy goes on from iter 5; torch's last loss ends 2% off
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                off = lambda i: 1.02 if mode == "torch" and i == 10 else 1  # noqa: E731
                f.writelines(json.dumps(dict(train_row(i, 0.5), loss=loss(i) * off(i))) + "\n" for i in range(6, 11))
        else:
            write_run(out_dir, [dict(train_row(i, 0.5), loss=loss(i)) for i in range(1, 11)])
            os.makedirs(os.path.join(out_dir, "ckpt"))
        return 0
    monkeypatch.setattr(gpu_check_module, "train", train)
    monkeypatch.setattr(gpu_check_module, "host_cost", lambda args, mode, out_json: (100, 0))
    monkeypatch.setattr(precision, "te_available", lambda: (False, "not installed here"))
    status = gpu_check(["--cpu", "--max_iters=10", f"--out_dir={tmp_path / 'check'}", f"--data_dir={tmp_path / 'unused'}"])
    lines = capsys.readouterr().out.splitlines()
    final = {m: sum((5 - 0.1 * i) * s for i in range(6, 11)) / 5 for m, s in scale.items()}  # the last 5 logged losses
    assert final == pytest.approx({"bf16": 4.2, "torch": 4.452})
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["bf16"], ["torch"])}
    assert rows["bf16"][-4:-2] == [f"{final['bf16']:.4f}", "0.0e+00"]
    assert rows["torch"][-4:-2] == [f"{final['torch']:.4f}", "2.0e-02"]
    assert status == 1 and lines[-3:] == ["FAILED torch: resumed loss differs by 2.0e-02 > 0.01",
                                          "FAILED torch: loss 4.4520 vs bf16 4.2000 (> 5% apart)", "2 check(s) failed"]
    assert gpu_check(["--cpu", "--max_iters=10", "--loss_rtol=0.07", "--resume_rtol=0.03",
                      f"--out_dir={tmp_path / 'again'}", f"--data_dir={tmp_path / 'unused'}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "all checks passed"
