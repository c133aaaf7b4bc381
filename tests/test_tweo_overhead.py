"""bench/tweo_overhead.py: TWEO's step-time and memory ratios, with their targets."""
import re
import subprocess
import sys

from conftest import REPO


def test_prints_both_ratios_and_targets_last():
    r = subprocess.run([sys.executable, "bench/tweo_overhead.py", "--n_head=2", "--n_embd=32", "--block_size=32",
                        "--vocab_size=512", "--micro_batch_size=2", "--rounds=3", "--steps=1", "--warmup=1",
                        "--device=cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("model: 12 layers x 32") and lines[1].startswith("GEMM path: ")
    time_line = re.fullmatch(r"time ratio: (\d+\.\d+) \(target <= 1\.02\)", lines[-2])
    memory_line = re.fullmatch(r"memory ratio: (\d+\.\d+) \(target <= 1\.01\)", lines[-1])
    assert time_line and memory_line, lines[-2:]
    # the printed time ratio is the median of the per-round ratios, inside their printed range
    spread = re.search(r"median (\d+\.\d+), interquartile (\d+\.\d+)\.\.(\d+\.\d+), range (\d+\.\d+)\.\.(\d+\.\d+)", r.stdout)
    median, q1, q3, low, high = map(float, spread.groups())
    assert float(time_line.group(1)) == median and low <= q1 <= median <= q3 <= high
    assert 0.5 < float(memory_line.group(1)) < 2


def test_bad_input_is_one_line_and_exit_2():
    for arg, key in (("--precision=fp16", "precision"), ("--cpu_gemm=both", "cpu_gemm")):
        r = subprocess.run([sys.executable, "bench/tweo_overhead.py", arg], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and key in r.stderr
