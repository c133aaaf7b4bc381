"""bench/gpu_check.py: its logic on CPU (tiny config, two steps): it trains through train.py,
resumes a copy from the middle checkpoint, checks, and prints Table 10's columns."""
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
                                     "loss", "resume"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 3]}
    assert set(rows) == {"bf16", "torch"} and rows["bf16"][2] == "1.00x" and rows["bf16"][6] == "1.00x"
    assert float(rows["torch"][-1]) < 1e-2 and float(rows["bf16"][-1]) < 1e-2  # resumed runs reproduce the loss
    assert lines[-1] == "all checks passed"
    assert (out_dir / "torch_resumed" / "ckpt" / "iter_0000002").is_dir()
    r = subprocess.run([sys.executable, "bench/gpu_check.py", f"--out_dir={out_dir}"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "exists" in r.stderr  # never writes into an existing directory
