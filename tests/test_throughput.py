"""bench/throughput.py: the four modes side by side, printed and written as JSON."""
import json
import subprocess
import sys

from conftest import REPO

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=512", "--micro_batch_size=2",
         "--iters=2", "--warmup=1", "--device=cpu"]


def run(*args):
    return subprocess.run([sys.executable, "bench/throughput.py", *SMALL, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_four_modes_printed_and_written(tmp_path):
    path = tmp_path / "sub" / "throughput.json"
    r = run(f"--json={path}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "FP8 is emulated on CPU" in r.stdout
    table = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
             ("bf16", "bf16_tweo", "fp8", "fp8_tweo")}
    assert list(table) == ["bf16", "bf16_tweo", "fp8", "fp8_tweo"]
    assert [t[1] for t in table.values()] == ["bf16", "bf16", "emulated", "emulated"]
    report = json.loads(path.read_text())
    assert report["device"] == "cpu" and report["fp8_emulated"] is True and report["model"]["n_layer"] == 1
    assert [x["mode"] for x in report["results"]] == list(table)
    for x in report["results"]:
        assert x["iter_per_hour"] == 3600 / x["s_per_iter"] and x["peak_gb"] > 0
        assert f"{x['s_per_iter']:.3f}" == table[x["mode"]][2]  # the JSON holds what was printed
    assert report["results"][0]["iter_per_hour_vs_first"] == 0.0


def test_an_existing_json_is_never_overwritten(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("keep")
    r = run(f"--json={path}")
    assert r.returncode == 2 and "already exists" in r.stderr and r.stdout == "" and path.read_text() == "keep"
