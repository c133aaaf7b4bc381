"""bench/hellaswag.py: llm.c's HellaSwag scoring, against a model whose answers are known by
construction and against each ending's loss computed alone."""
import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, write_run

import bench.hellaswag as hellaswag
from bench.eval import load_model
from bench.export_hf import main as export_hf
from model import GPT, GPTConfig, load_trained
from prepare_openwebtext import gpt2_tokenizer

FIXTURE = os.path.join(REPO, "tests", "fixtures", "hellaswag_tiny.jsonl")
# the run.json keys that bench/eval.py reads and conftest.write_run does not write
RUN_KEYS = dict(fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max", eval_windows=8)


def fixture_examples():
    with open(FIXTURE) as f:
        return [json.loads(line) for line in f]


def refusal(capsys, call):
    """The one stderr line of a call that must exit with status 2."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def ending_tokens(ending):
    return gpt2_tokenizer().encode_ordinary(" " + ending)


def unigram_run(tmp_path, data_dir, favoured, gap, block_size):
    """A GPT whose logits ignore its input: the final LayerNorm's gain 0 and bias e_0 make every
    position's features e_0, so the logits are wte[:, 0]: `gap` for the favoured tokens, 0 for
    GPT-2's other tokens, gap + 5 for the padded entries (which the softmax must leave out)."""
    args = dict(n_layer=1, n_head=1, n_embd=16, block_size=block_size, vocab_size=50304, bias=True, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        model.lm_head.layer_norm_weight.zero_()
        model.lm_head.layer_norm_bias.zero_()[0] = 1.0
        wte = model.transformer.wte.weight
        wte[:, 0] = 0.0
        wte[sorted(favoured), 0] = gap
        wte[50257:, 0] = gap + 5
    out_dir = write_run(tmp_path / "unigram", [], model_args=args, data_dir=data_dir, **RUN_KEYS)
    torch.save({"model": model.state_dict(), "model_args": args, "config": {}}, os.path.join(out_dir, "model_last.pt"))
    return out_dir


@pytest.mark.parametrize("block_size", [64, 16])
def test_the_answers_of_a_model_built_to_know_them(demo_data, tmp_path, capsys, block_size):
    # The model favours exactly the tokens of the right endings, so a right ending has the lowest mean
    # loss. By summed loss, example 0's 8-token right ending loses to its 1-token wrong one ("jumps"):
    # acc_norm 4/4, acc 3/4. Every ending's loss is known in closed form: log Z - logit.
    examples = fixture_examples()
    favoured = {t for ex in examples for t in ending_tokens(ex["endings"][ex["label"]])}
    wrong = {t for ex in examples for i, e in enumerate(ex["endings"]) if i != ex["label"] for t in ending_tokens(e)}
    assert len(favoured) == 25 and not favoured & wrong
    gap = 18.0
    out_dir = unigram_run(tmp_path, demo_data, favoured, gap, block_size)
    result = hellaswag.main([f"--out_dir={out_dir}", f"--data={FIXTURE}", "--batch_size=3"])

    log_z = math.log(len(favoured) * math.exp(gap) + 50257 - len(favoured))  # over GPT-2's 50257 tokens only
    for ex, r in zip(examples, result["results"]):
        tokens = [ending_tokens(e) for e in ex["endings"]]
        assert r["n_tokens"] == [len(t) for t in tokens]  # a multi-token ending and endings of 1 to 12 tokens
        assert r["sum_loss"] == pytest.approx([sum(log_z - gap * (t in favoured) for t in ts) for ts in tokens], rel=1e-5)
        assert r["pred_norm"] == ex["label"] and r["pred"] == (1 if ex["ind"] == 0 else ex["label"])
    assert (result["acc_norm"], result["acc"], result["examples"]) == (1.0, 0.75, 4)
    assert result["acc_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4)) and result["acc_norm_se"] == 0.0
    # every context + ending is 19 to 25 tokens: with 16 positions each loses the start of its context
    assert result["context_cut"] == (0 if block_size == 64 else 4)
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith(f"{out_dir} (last, bf16): HellaSwag acc_norm 1.0000 ± 0.0000, acc 0.7500 ± 0.2165 over 4 "
                              f"examples of {FIXTURE}")
    assert summary.endswith("" if block_size == 64 else "(4 with their context cut to the block size 16)")


def direct_losses(model, example, n_vocab=50257):
    """Each ending's summed loss from a forward pass of the context and that ending alone."""
    enc = gpt2_tokenizer()
    ctx, losses = enc.encode_ordinary(example["ctx"]), []
    for ending in example["endings"]:
        end = ending_tokens(ending)
        ids = torch.tensor([ctx + end])
        with torch.no_grad():
            logits = model(ids[:, :-1], ids[:, 1:]).logits[0, -len(end):, :n_vocab]
        losses.append(F.cross_entropy(logits.float(), ids[0, -len(end):], reduction="sum").item())
    return losses


def test_batched_scoring_equals_each_ending_scored_alone(runs):
    # fp32: the batched, padded and masked scoring and the direct one are the same sums in another order
    model = load_trained(runs["bf16"])[0].float()
    examples = fixture_examples()
    results = hellaswag.score(model, contextlib.nullcontext, examples, gpt2_tokenizer(), 50257, batch_size=3)
    for ex, r in zip(examples, results):
        direct = direct_losses(model, ex)
        mean = [s / len(ending_tokens(e)) for s, e in zip(direct, ex["endings"])]
        assert r["sum_loss"] == pytest.approx(direct, rel=1e-5)
        assert r["mean_loss"] == pytest.approx(mean, rel=1e-5)
        assert (r["pred"], r["pred_norm"]) == (direct.index(min(direct)), mean.index(min(mean)))


def test_fp8_scores_with_the_checkpoints_scaling_state(runs):
    ev, bf16 = load_model(runs["fp8_tweo"], device="cpu"), load_model(runs["fp8_tweo"], precision="bf16", device="cpu")
    scales = {k: v.clone() for k, v in ev.model.state_dict().items() if ".fp8_" in k}
    assert ev.precision == "fp8" and scales
    examples, enc = fixture_examples(), gpt2_tokenizer()
    autocast = lambda: ev.backend.autocast(ev.model)  # noqa: E731
    results = hellaswag.score(ev.model, autocast, examples, enc, 50257, batch_size=4)
    in_bf16 = hellaswag.score(bf16.model, lambda: bf16.backend.autocast(bf16.model), examples, enc, 50257, batch_size=4)
    for ex, r, b in zip(examples, results, in_bf16):
        with autocast():
            direct = direct_losses(ev.model, ex)
        # within bf16's rounding of activations of another shape (measured: up to 4e-4)
        assert r["sum_loss"] == pytest.approx(direct, rel=1e-3)
        assert r["sum_loss"] != b["sum_loss"]  # the same weights and batches through FP8 GEMMs: other bits
    assert all(torch.equal(v, ev.model.state_dict()[k]) for k, v in scales.items())  # scoring changed no scale


def test_a_run_and_its_export_score_the_same_and_the_file_is_named(runs, tmp_path, capsys):
    to = str(tmp_path / "export")
    export_hf([f"--out_dir={runs['bf16']}", f"--to={to}"])
    jsonl = tmp_path / "results.jsonl"
    run = hellaswag.main([f"--out_dir={runs['bf16']}", f"--data={FIXTURE}", f"--jsonl={jsonl}", "--limit=3"])
    blob = subprocess.run(["git", "hash-object", FIXTURE], capture_output=True, text=True, check=True).stdout.strip()
    assert capsys.readouterr().out.splitlines()[-2] == (f"{FIXTURE} is not the official HellaSwag validation file "
                                                        f"(git blob {blob}, not {hellaswag.OFFICIAL_BLOB}): scored as given")
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == run["results"] and run["examples"] == 3
    written = jsonl.read_bytes()
    with pytest.raises(SystemExit) as stop:  # results already written are never overwritten
        hellaswag.main([f"--out_dir={runs['bf16']}", f"--data={FIXTURE}", f"--jsonl={jsonl}"])
    assert stop.value.code == 2 and "must be a file that does not exist yet" in capsys.readouterr().err
    assert jsonl.read_bytes() == written
    exported = hellaswag.main([f"--hf={to}", f"--data={FIXTURE}", "--limit=3"])
    assert [r["sum_loss"] for r in exported["results"]] == [r["sum_loss"] for r in run["results"]]  # bit for bit


def test_the_official_file_is_downloaded_once_and_checked(tmp_path, monkeypatch, capsys):
    path = tmp_path / "data" / "hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag, "OFFICIAL_PATH", str(path))
    monkeypatch.setattr(hellaswag, "OFFICIAL_URL", f"file://{FIXTURE}")  # a file that is not the official one
    err = refusal(capsys, hellaswag.official_file)
    assert f"file://{FIXTURE} sent a file whose git blob id is" in err and not path.exists()
    with open(FIXTURE, "rb") as f:
        monkeypatch.setattr(hellaswag, "OFFICIAL_BLOB", hellaswag.git_blob_id(f.read()))
    assert hellaswag.official_file() == str(path) and path.read_text() == open(FIXTURE).read()
    monkeypatch.setattr(hellaswag, "OFFICIAL_URL", "file:///nonexistent/hellaswag_val.jsonl")
    assert hellaswag.official_file() == str(path)  # there now: not fetched again
    path.unlink()
    err = refusal(capsys, hellaswag.official_file)
    assert err.startswith(f"error: {path} not found and not downloadable (") and \
        err.endswith("download file:///nonexistent/hellaswag_val.jsonl there, or give --data=FILE\n")


def test_bad_data_and_compact_runs_are_refused_with_one_line(demo_compact_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(FIXTURE).read() + json.dumps(dict(fixture_examples()[0], label=4)) + "\n")
    assert refusal(capsys, lambda: hellaswag.main([f"--data={bad}"])) == \
        f"error: {bad}:5 is not a HellaSwag example (a JSON object with a ctx, 4 endings and a label 0-3)\n"
    # a run.json and no checkpoint: refused before any loading
    compact = write_run(tmp_path / "compact", [], model_args=dict(vocab_size=5184), data_dir=demo_compact_data, **RUN_KEYS)
    assert refusal(capsys, lambda: hellaswag.main([f"--out_dir={compact}", f"--data={FIXTURE}"])) == \
        (f"error: {compact} was trained on a compact vocabulary of 5171 ids ({demo_compact_data}): it has no ids for "
         f"most of HellaSwag's GPT-2 tokens\n")


def test_the_command_line_says_where_to_get_a_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "bench/hellaswag.py", f"--data={tmp_path}/hellaswag_val.jsonl"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"error: {tmp_path}/hellaswag_val.jsonl: No such file or directory: give a HellaSwag jsonl file "
                        f"(the official one: {hellaswag.OFFICIAL_URL})\n")
