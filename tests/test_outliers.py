"""bench/outliers.py: where the massive activations sit, on planted activations with known answers
and on a real run."""
import json
import subprocess
import sys

import pytest
import torch

from bench.outliers import locate
from conftest import REPO


def planted(kind):
    """tokens [4, 32] and two layers of block outputs [4, 32, 16] with N(0, 1) values and a plant."""
    torch.manual_seed(0)
    tokens = torch.arange(4 * 32).reshape(4, 32)
    outputs = [torch.randn(4, 32, 16) for _ in range(2)]
    if kind == "few tokens":  # Sun et al.'s kind: the first token of each window, channel 3
        outputs[1][:, 0, 3] = 5000.0
    if kind == "channel-wide":  # channel 5 huge on every token
        outputs[1][:, :, 5] = -2000.0
    return tokens, outputs


def test_planted_massive_activations_are_located_and_classified():
    result = locate(*planted("few tokens"), decode=lambda i: f"t{i}", top=3)
    first, second = result["layers"]
    assert first["massive"] == 0 and first["positions"] == 0 and first["at_position_0"] is None
    assert second["massive"] == 4 and second["channels"] == [(3, 4)] and second["positions"] == 4
    assert second["position_share"] == 4 / 128 and second["at_position_0"] == 1.0
    assert sorted(second["tokens"]) == [("t0", 1), ("t32", 1), ("t64", 1), ("t96", 1)]
    assert second["top_channel"] == 3 and second["top_channel_share_10x"] == pytest.approx(4 / 128)
    assert [(r["value"], r["layer"], r["position"], r["channel"]) for r in result["largest"]] == [(5000.0, 1, 0, 3)] * 3
    # 4 of 128 positions is above the 2% of "a few tokens": channel-wide by the rule, with the numbers to say so
    assert result["verdict"] == "channel-wide" and result["massive_channels"] == [3]

    tokens, outputs = planted("few tokens")
    tokens, outputs = tokens.repeat(8, 1), [o.repeat(8, 1, 1) for o in outputs]
    outputs[1][4:, 0, 3] = 0.5  # only the first 4 of 32 windows keep their massive first token
    result = locate(tokens, outputs, decode=str)
    assert result["layers"][1]["position_share"] == 4 / 1024 and result["verdict"] == "few tokens, fixed channels"


def test_channel_wide_and_no_massive_activation():
    wide = locate(*planted("channel-wide"), decode=str)
    # the channel is every position's: the median |value| of the layer stays ~0.7, 2000 is massive
    assert wide["layers"][1]["massive"] == 128 and wide["layers"][1]["position_share"] == 1.0
    assert wide["verdict"] == "channel-wide" and wide["layers"][1]["top_channel_median"] == 2000.0
    none = locate(*planted("none"), decode=str)
    assert none["verdict"] == "none" and all(r["massive"] == 0 for r in none["layers"])


def test_a_real_run_and_bad_input(runs):
    r = subprocess.run([sys.executable, "bench/outliers.py", f"--out_dir={runs['bf16']}", "--windows=8", "--top=4",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["layers"]) == 2 and len(result["largest"]) == 4 and result["windows"] == 8
    assert result["largest"][0]["abs"] == max(layer["max"] for layer in result["layers"])
    assert "| layer | max abs |" in r.stdout and f"Verdict: {result['verdict']}" in r.stdout
    bad = subprocess.run([sys.executable, "bench/outliers.py", f"--out_dir={runs['bf16']}", "--windows=0"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.strip().splitlines() == ["error: --windows must be >= 1"]
