"""bench/stethoscope.py: the four conditions are what they claim, and the statistics equal a
direct computation on the same batch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.eval import load
from bench.stethoscope import CONDITIONS, STATS, conditions, main as stethoscope_main, stethoscope
from conftest import REPO, compact_run, refused


def direct(model, tokens):
    """Block outputs by running the blocks by hand; per layer the mean over samples of each
    sample's max and min, the mean |value|; and each sample's max |value| over all layers."""
    outs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pos = torch.arange(tokens.size(1))
        x = model.transformer.wte(tokens) + model.transformer.wpe(pos)
        for block in model.transformer.h:
            x = block(x)
            outs.append(x.float().numpy().reshape(len(tokens), -1).astype(np.float64))
    layers = {"avg_max": [o.max(axis=1).mean() for o in outs], "avg_min": [o.min(axis=1).mean() for o in outs],
              "mean_abs": [np.abs(o).mean() for o in outs]}
    peaks = np.max([np.abs(o).max(axis=1) for o in outs], axis=0)
    return layers, {"max": peaks.max(), "min": peaks.min(), "avg_max": peaks.mean()}


@pytest.fixture(scope="module")
def ev(runs):
    return load(out_dir=runs["bf16"], precision="bf16")


def test_the_conditions_are_what_they_claim(ev):
    conds = conditions(ev, windows=16, seed=3)
    assert list(conds) == list(CONDITIONS)
    trained = ev.model.state_dict()
    (a, real), (b, real_b), (c, real_c), (d, uniform) = conds.values()
    assert a is ev.model and d is ev.model and torch.equal(real, real_b) and torch.equal(real, real_c)
    # (b): only wte and wpe are new, drawn as the model initialises them; the LM head keeps the trained wte
    for k, v in b.state_dict().items():
        if k in ("transformer.wte.weight", "transformer.wpe.weight"):
            assert not torch.equal(v, trained[k]) and abs(v.float().std().item() - 0.02) < 0.002, k
        else:
            assert torch.equal(v, trained[k]), k
    assert torch.equal(b.lm_head.weight, trained["transformer.wte.weight"])
    # (c): every weight fresh
    assert all(not torch.equal(v, trained[k]) for k, v in c.state_dict().items() if k.endswith("weight")
               and not k.endswith("layer_norm_weight"))
    # (d): uniform over the tokenizer's 50257 tokens (never the padding), unlike the real text
    n, v = uniform.numel(), 50257
    assert uniform.shape == real.shape and uniform.min() >= 0 and uniform.max() < v
    counts = np.bincount(uniform.numpy().ravel() * 16 // v, minlength=16)  # 16 equal bins
    expected = n / 16
    assert ((counts - expected) ** 2 / expected).sum() < 40  # chi-square, 15 dof: p < 1e-3 beyond ~37.7
    real_counts = np.bincount(real.numpy().ravel() * 16 // v, minlength=16)
    assert ((real_counts - expected) ** 2 / expected).sum() > 1000  # text is far from uniform
    assert len(torch.unique(uniform)) > 0.9 * n  # few repeats among 50257 equally likely tokens


def test_statistics_equal_a_direct_computation_on_the_same_batch(ev):
    result = stethoscope(ev, windows=16, seed=3)
    for key, (model, tokens) in conditions(ev, windows=16, seed=3).items():
        layers, peaks = direct(model, tokens)
        for stat, values in layers.items():
            assert result["conditions"][key][stat] == pytest.approx(values, rel=1e-5), (key, stat)
        if key in ("a", "d"):
            got = result["table1"]["real" if key == "a" else "random"]
            assert got == pytest.approx(peaks, rel=1e-5), key
    a, c = result["conditions"]["a"], result["conditions"]["c"]
    assert a["avg_max"][-1] > 5 * c["avg_max"][-1]  # trained weights, not data, make the large values


def test_the_command_line_writes_a_table_json_and_a_figure_and_never_overwrites(runs, ev, tmp_path):
    png = tmp_path / "st.png"
    cmd = [sys.executable, "bench/stethoscope.py", f"--out_dir={runs['bf16']}", "--windows=8", f"--png={png}", "--json"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result["conditions"]) == set("abcd") and len(result["conditions"]["a"]["avg_max"]) == 2
    assert "Supplementary Table 1" in r.stdout and "Avg Max" in r.stdout
    # the JSON: each condition's numbers are those of that condition's model and tokens (seed 0, 8 windows),
    # computed here by hand; the conditions' numbers differ, so a swap of two would show
    peaks = {}
    for key, (model, tokens) in conditions(ev, windows=8, seed=0).items():
        layers, peaks[key] = direct(model, tokens)
        for stat, values in layers.items():
            assert result["conditions"][key][stat] == pytest.approx(values, rel=1e-5), (key, stat)
    assert result["table1"] == {"real": pytest.approx(peaks["a"], rel=1e-5), "random": pytest.approx(peaks["d"], rel=1e-5)}
    # the printed table: per layer, (a) to (d) left to right, Avg Max / Avg Min / Mean-Abs each, as in the JSON
    lines = r.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:3] == ["layer", "Avg", "Max"]))
    printed = [[part.split() for part in line.split("|")] for line in lines[header + 1:header + 3]]
    for layer, groups in enumerate(printed):
        assert groups[0][0] == str(layer) and len(groups) == len(CONDITIONS)
        values = [g[-3:] for g in groups]
        assert all(a != b for i, a in enumerate(values) for b in values[i + 1:]), values
        for key, shown in zip(CONDITIONS, values):
            assert [float(v) for v in shown] == [float(f"{result['conditions'][key][s][layer]:.4g}") for s in STATS], key
    assert lines[header + 3] == "" and "Supplementary Table 1" in lines[header + 4]
    rows = {line[:14].strip(): [float(v) for v in line[14:].split()] for line in lines[header + 6:header + 8]}
    for name, key in (("Real text", "real"), ("Random tokens", "random")):
        assert rows[name] == [float(f"{result['table1'][key][s]:.4g}") for s in ("max", "min", "avg_max")], name
    assert rows["Real text"] != rows["Random tokens"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.read_bytes()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr and png.read_bytes() == before
    assert os.path.getsize(png) > 10000


def test_a_hugging_face_gpt2_goes_through_the_stethoscope(hf_gpt2, demo_data, tmp_path):
    r = subprocess.run([sys.executable, "bench/stethoscope.py", f"--hf={hf_gpt2[0]}", f"--data_dir={demo_data}",
                        "--windows=4", f"--png={tmp_path / 'hf.png'}", "--json"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["model"] == hf_gpt2[0] and result["block_size"] == 64 and (tmp_path / "hf.png").exists()


def test_a_png_that_cannot_be_written_is_refused_before_loading(runs, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    png = tmp_path / "afile" / "s.png"
    err = refused(capsys, stethoscope_main, f"--out_dir={runs['bf16']}", f"--png={png}")
    assert err == f"error: --png={png} is not a file this process can write (its folder cannot be written or created)\n"


def test_a_compact_vocabulary_run_draws_random_tokens_from_its_own_ids(demo_compact_data, tmp_path):
    """(d) on a --compact_vocab run: uniform over the corpus's 5,171 ids, which the model's 5184 rows hold
    (GPT-2's 50257 would index past its embedding)."""
    out_dir, meta = compact_run(tmp_path, demo_compact_data)
    ev = load(out_dir=out_dir, eval_iters=1)
    assert ev.vocab_size == meta["vocab_size"] == 5171
    _, uniform = conditions(ev, windows=64, seed=0)["d"]
    assert uniform.max() < 5171 and uniform.max() > 5000  # the whole range, not GPT-2's, not the padding
    result = stethoscope(ev, windows=8)  # through all four conditions
    assert list(result["conditions"]) == list(CONDITIONS) and result["windows"] == 8
