"""bench/export_hf.py: a trained run as a transformers GPT2LMHeadModel with the same logits, and back."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compact_run, refused, write_run

from bench.export_hf import main as export_hf
from model import load_trained
from prepare_openwebtext import demo_documents, gpt2_tokenizer


def export(tmp_path, name, *args):
    to = str(tmp_path / name)
    export_hf([*args, f"--to={to}"])
    return to


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """runs['bf16'] exported."""
    return export(tmp_path_factory.mktemp("export"), "bf16", f"--out_dir={runs['bf16']}")


def hf_model(d):
    from transformers import GPT2LMHeadModel
    model, info = GPT2LMHeadModel.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def same_logits(ours, hf, n_vocab, block_size):
    """Our fp32 logits over the real vocabulary equal GPT2LMHeadModel's, on random tokens."""
    idx = torch.randint(0, n_vocab, (2, block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(idx).logits, ours.float()(idx, idx).logits
    assert want.shape[-1] == n_vocab
    torch.testing.assert_close(got[..., :n_vocab], want, rtol=1e-5, atol=1e-5)
    assert (want - want.mean()).abs().mean() > 0.1  # far from constant: the comparison has teeth


def test_a_trained_run_exports_to_a_gpt2_with_its_logits(runs, exported):
    to = exported
    config = json.load(open(os.path.join(to, "config.json")))
    assert (config["vocab_size"], config["n_positions"], config["n_layer"], config["n_embd"]) == (50257, 64, 2, 64)
    assert json.load(open(os.path.join(to, "generation_config.json"))) == {"bos_token_id": 50256, "eos_token_id": 50256}
    ours, _ = load_trained(runs["bf16"])
    same_logits(ours, hf_model(to), 50257, 64)


def test_export_then_import_then_export_is_byte_identical(runs, tmp_path):
    first = export(tmp_path, "first", f"--out_dir={runs['fp8_tweo']}")
    second = export(tmp_path, "second", f"--hf={first}")
    for name in ("model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt"):
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(second, name), "rb").read(), name


def test_a_zero3_tag_exports_as_the_consolidated_file_and_fp8_says_what_is_left_out(runs, tmp_path, capsys):
    last = export(tmp_path, "last", f"--out_dir={runs['fp8']}")
    assert "note: trained in FP8: its bf16 weights are exported; the FP8 scaling state is not part of a GPT-2 " \
           "checkpoint" in capsys.readouterr().out
    tag = export(tmp_path, "tag", f"--out_dir={runs['fp8']}", "--ckpt=iter_0000024")
    earlier = export(tmp_path, "earlier", f"--out_dir={runs['fp8']}", "--ckpt=iter_0000016")
    weights = lambda d: open(os.path.join(d, "model.safetensors"), "rb").read()  # noqa: E731
    assert weights(tag) == weights(last)  # bf16 copies of the same fp32 master weights
    assert weights(earlier) != weights(last)  # the tag was read, not the last file


def test_the_tokenizer_encodes_as_tiktoken(exported):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(exported)
    enc = gpt2_tokenizer()
    texts = ["Hello world", " the  quick\n\n brown fox's 1234567 héllo 日本語 🤖", "  \t x\r\n", "aaaa ababa abab"]
    for text in texts + demo_documents():  # the demo corpus: ~140k tokens of English prose and Python
        assert tok(text)["input_ids"] == enc.encode_ordinary(text)
    assert tok.decode(enc.encode_ordinary(texts[1])) == texts[1] and tok.eos_token_id == 50256 and len(tok) == 50257


def test_a_compact_vocabulary_run_exports_its_own_vocabulary_and_no_tokenizer(runs, demo_compact_data, tmp_path, capsys):
    to = export(tmp_path, "to", f"--out_dir={runs['bf16']}")  # a GPT-2 export, overwritten below
    out_dir, meta = compact_run(tmp_path, demo_compact_data)
    export_hf([f"--out_dir={out_dir}", f"--to={to}", "--overwrite"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: no tokenizer written: the model's 5171 token ids are a compact vocabulary's "
                     "(its data's vocab_map.npy), not GPT-2's"]
    assert not {"vocab.json", "merges.txt", "tokenizer_config.json"} & set(os.listdir(to))  # the old ones are gone
    config = json.load(open(os.path.join(to, "config.json")))
    assert config["vocab_size"] == meta["vocab_size"] == 5171 and config["eos_token_id"] == meta["eot_token"]
    ours, _ = load_trained(out_dir)
    same_logits(ours, hf_model(to), 5171, 32)  # zero biases in GPT-2 = none in ours


def test_an_existing_directory_is_not_written_without_overwrite(runs, tmp_path, capsys):
    to = tmp_path / "taken"
    to.mkdir()
    (to / "config.json").write_text("mine")
    err = refused(capsys, export_hf, f"--out_dir={runs['bf16']}", f"--to={to}")
    assert err == f"error: {to} exists: give --overwrite to write the export into it\n"
    assert os.listdir(to) == ["config.json"] and (to / "config.json").read_text() == "mine"


@pytest.mark.parametrize("option, named", [(dict(attn_bias=True), "attn_bias"),
                                           (dict(clipped_softmax_gamma=-0.03), "clipped softmax (gamma=-0.03, zeta=1)")])
def test_invasive_runs_are_refused_before_any_work(tmp_path, capsys, option, named):
    # a run.json and no checkpoint at all: the refusal comes before any loading
    out_dir = write_run(tmp_path / "run", [], model_args=option)
    err = refused(capsys, export_hf, f"--out_dir={out_dir}", f"--to={tmp_path / 'to'}")
    assert err == f"error: {out_dir} uses {named}, which GPT-2 has no equivalent for: it cannot be exported\n"
    assert not (tmp_path / "to").exists()


def test_the_command_line_refuses_bad_input_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "bench/export_hf.py", f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: --to=DIR is needed: the directory to write the "
                                                          "Hugging Face model to\n")


def test_a_truncated_weights_file_and_an_unwritable_destination_are_one_line_each(exported, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a copy interrupted mid-transfer
    err = refused(capsys, export_hf, f"--hf={damaged}", f"--to={tmp_path / 'to'}")
    assert err.startswith(f"error: {weights} cannot be read: truncated or damaged (SafetensorError: ")
    assert not (tmp_path / "to").exists()
    (tmp_path / "afile").write_text("")
    err = refused(capsys, export_hf, f"--hf={exported}", f"--to={tmp_path / 'afile' / 'hf'}")
    assert err == f"error: --to={tmp_path / 'afile' / 'hf'} is not a directory this process can write or create\n"
