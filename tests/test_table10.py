"""bench/table10.py: the training cost of runs against the Default (BF16) run of their size."""
import json

import pytest

from bench.table10 import main as table10
from conftest import train_row, write_run


def test_times_extrapolate_to_max_iters_and_compare_with_default(tmp_path, capsys):
    default = write_run(tmp_path / "a", [train_row(10, 2.0, mem_peak_gb=4.0), train_row(20, 4.0, mem_peak_gb=5.0)],
                        world_size=8, max_iters=1000)
    fp8 = write_run(tmp_path / "b", [train_row(10, 2.0, mem_peak_gb=3.0)], world_size=8, max_iters=1000,
                    precision="fp8", tweo_lambda=0.01)
    other_size = write_run(tmp_path / "c", [train_row(10, 1.0)], max_iters=1000, precision="fp8", model_args=dict(n_layer=4))
    rows = table10([fp8, other_size, default, "--json"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == rows
    by_method = {(r["model"], r["method"]): r for r in rows}
    d, f, o = by_method[("GPT 2L×64", "Default")], by_method[("GPT 2L×64", "FP8+TWEO")], by_method[("GPT 4L×64", "FP8")]
    # Default: 3 s/iter over 20 iterations; 1000 iterations x 3 s x 8 GPUs
    assert d["iter_per_hour"] == pytest.approx(1200) and d["total_hours"] == pytest.approx(1000 * 3 * 8 / 3600)
    assert d["vram_gb"] == 5.0 and d["iters_timed"] == 20 and d["total_vs_default"] == pytest.approx(0.0)
    # FP8+TWEO: 2 s/iter, 1.5x the iterations per hour, 2/3 of the time
    assert f["iter_per_hour"] == pytest.approx(1800) and f["iter_per_hour_vs_default"] == pytest.approx(0.5)
    assert f["total_vs_default"] == pytest.approx(-1 / 3) and f["vram_gb"] == 3.0
    assert o["total_vs_default"] is None and o["total_hours"] == pytest.approx(1000 / 3600)  # no Default of its size
    assert "| GPT 2L×64 (3.32M) | FP8+TWEO | 3.00 | 4.44 (-33%) | 1800 (+50%) | 8 | 10 of 1000 |" in out
