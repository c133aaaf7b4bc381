"""sample.py: text from a checkpoint the suite trained, deterministic under a seed."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_samples_have_the_requested_count_and_length_and_repeat_under_a_seed(runs):
    args = [f"--out_dir={runs['fp8_tweo']}", "--start=The function", "--num_samples=3", "--max_new_tokens=20", "--seed=5"]
    a, b, c = sample(*args, "--print_json"), sample(*args, "--print_json"), sample(*args[:-1], "--seed=6", "--print_json")
    assert a.returncode == 0, a.stderr
    rows = [json.loads(line) for line in a.stdout.splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2] and all(len(r["tokens"]) == 20 for r in rows)
    assert a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stderr.strip() == "note: trained in FP8, sampling in BF16"
    text = sample(*args)
    assert text.stdout.count("\n---------------\n") == 3 and text.stdout.startswith("The function")
    assert [t.removeprefix("The function") for t in text.stdout.split("\n---------------\n")[:3]] == [r["text"] for r in rows]


def test_the_zero3_checkpoint_samples_like_the_consolidated_file(runs):
    args = [f"--out_dir={runs['bf16']}", "--num_samples=2", "--max_new_tokens=12", "--seed=1", "--print_json"]
    consolidated, zero = sample(*args), sample(*args, "--ckpt=iter_0000024")
    assert zero.returncode == 0, zero.stderr
    assert consolidated.stdout == zero.stdout  # bf16 copies of the same fp32 master weights


def test_prompt_from_a_file(runs, tmp_path):
    (tmp_path / "prompt.txt").write_text("Lists are")
    r = sample(f"--out_dir={runs['bf16']}", f"--start=FILE:{tmp_path}/prompt.txt", "--num_samples=1", "--max_new_tokens=5")
    assert r.returncode == 0 and r.stdout.startswith("Lists are")


def test_missing_and_mismatched_checkpoints_fail_clearly(runs, tmp_path):
    r = sample(f"--out_dir={tmp_path}/nothing")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: no model_last.pt and no DeepSpeed checkpoint 'last' in {tmp_path}/nothing"]
    saved = torch.load(f"{runs['bf16']}/model_last.pt", weights_only=True)
    bigger = dict(saved, model_args=dict(saved["model_args"], n_embd=128))
    torch.save(bigger, tmp_path / "model_last.pt")
    r = sample(f"--out_dir={tmp_path}")
    assert r.returncode == 2 and "a checkpoint of another size or vocabulary" in r.stderr
    small_vocab = dict(saved, model_args=dict(saved["model_args"], vocab_size=1000))
    wte = saved["model"]["transformer.wte.weight"][:1000]
    small_vocab["model"] = dict(saved["model"], **{"transformer.wte.weight": wte, "lm_head.weight": wte})
    torch.save(small_vocab, tmp_path / "model_last.pt")
    r = sample(f"--out_dir={tmp_path}")
    assert r.returncode == 2 and "smaller than GPT-2's" in r.stderr


@pytest.mark.parametrize("arg, message", [
    ("--num_samples=0", "num_samples=0 must be >= 1"),
    ("--temperature=0", "temperature=0.0 must be > 0 and finite"),
    ("--top_k=0", "top_k=0 must be >= 1"),
    ("--device=tpu", "device='tpu' must be 'auto', 'cpu', or 'cuda[:N]' with that GPU present"),
])
def test_a_value_out_of_range_is_one_line(tmp_path, arg, message):
    r = sample(f"--out_dir={tmp_path}", arg)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {message}"] and r.stdout == ""


@pytest.mark.parametrize("case", ["truncated", "text", "foreign", "not tensors", "wrong model args"])
def test_a_truncated_or_foreign_model_file_is_named_in_one_line(runs, tmp_path, case):
    path = tmp_path / "model_last.pt"
    real = open(f"{runs['bf16']}/model_last.pt", "rb").read()
    saved = torch.load(f"{runs['bf16']}/model_last.pt", weights_only=True)
    if case == "truncated":
        path.write_bytes(real[:len(real) // 2])
    elif case == "text":
        path.write_text("hello")
    elif case == "foreign":
        torch.save({"state_dict": saved["model"]}, path)
    elif case == "not tensors":
        torch.save(dict(saved, model={k: 1 for k in saved["model"]}), path)
    else:
        torch.save(dict(saved, model_args=dict(saved["model_args"], n_experts=4)), path)
    r = sample(f"--out_dir={tmp_path}", "--max_new_tokens=2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}"), r.stderr
    assert "Traceback" not in r.stderr


def test_a_hugging_face_gpt2_samples_within_its_vocabulary(hf_gpt2):
    r = sample(f"--hf={hf_gpt2[0]}", "--start=Hello", "--num_samples=2", "--max_new_tokens=30", "--seed=2",
               "--print_json", "--top_k=50257")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(len(row["tokens"]) == 30 and max(row["tokens"]) < 50257 for row in rows)
