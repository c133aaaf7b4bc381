"""bench/gpu_check.py: its logic on CPU (tiny config, two steps): it trains through train.py,
resumes a copy from the middle checkpoint, checks, and prints Table 10's columns."""
import json
import subprocess
import sys

from conftest import REPO


def test_gpu_check_runs_its_checks_and_prints_table_10(demo_data, tmp_path):
    out_dir = tmp_path / "check"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--config=configs/tiny.py", "--max_iters=2",
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
