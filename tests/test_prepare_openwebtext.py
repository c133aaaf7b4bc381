"""prepare_openwebtext.py: round trips of real corpora, the offline GPT-2 tokenizer, safety."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
import prepare_openwebtext as P

# GPT-2 ids from the reference encoder (tiktoken 'gpt2' / r50k_base) for strings that
# exercise unicode, whitespace runs and the special token written as plain text
GOLDEN = {
    "Hello world": [15496, 995],
    " the": [262],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],
    "naïve café 日本語 🙂": [2616, 38776, 40304, 10545, 245, 98, 17312, 105, 45739, 252, 32485],
    "a   b\n\n\tc": [64, 220, 220, 275, 628, 197, 66],
}


def prepare(*args):
    return subprocess.run([sys.executable, "prepare_openwebtext.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def documents(out_dir):
    enc = P.gpt2_tokenizer()
    docs = []
    for split in ("train", "val"):
        ids = np.memmap(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        assert ids[-1] == P.EOT  # every document ends with EOT
        cuts = np.flatnonzero(ids == P.EOT)
        starts = np.concatenate([[0], cuts[:-1] + 1])
        docs += [enc.decode(ids[s:e].tolist()) for s, e in zip(starts, cuts)]
    return docs


def test_the_tokenizer_gives_gpt2_ids():
    enc = P.gpt2_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == P.EOT
    for text, ids in GOLDEN.items():
        assert enc.encode_ordinary(text) == ids, text
        assert enc.decode(ids) == text


def test_the_local_ranks_file_has_the_sha256_tiktoken_publishes():
    import hashlib
    import inspect

    import tiktoken_ext.openai_public as openai_public
    # the hash tiktoken itself checks its download of r50k_base (= GPT-2) against
    published = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    assert f'expected_hash="{published}"' in inspect.getsource(openai_public.r50k_base)
    assert P.GPT2_RANKS_SHA256 == published
    assert os.path.isfile(P.GPT2_RANKS_FILE), f"{P.GPT2_RANKS_FILE} missing: run `make install` first"
    with open(P.GPT2_RANKS_FILE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == published


def test_demo_corpus_round_trips(tmp_path):
    r = prepare("--demo", f"--out_dir={tmp_path}/demo")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "demo" / "meta.json"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["source"] == "demo:pydoc_data.topics"
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(P.demo_documents())
    for split in ("train", "val"):
        path = tmp_path / "demo" / f"{split}.bin"
        assert path.stat().st_size == 2 * meta[split]["tokens"] and meta[split]["sha256"] == P._sha256_file(str(path))
    assert sorted(documents(tmp_path / "demo")) == sorted(P.demo_documents())
    assert not [f for f in os.listdir(tmp_path / "demo") if f.endswith(".tmp")]


def test_local_jsonl_and_txt_round_trip(tmp_path):
    docs = ["First document.\nWith two lines.", "naïve café 日本語 🙂", "  leading and trailing spaces  ",
            "<|endoftext|> written as plain text", "tabs\tand\n\n\nblank lines"]
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs[:3]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs[3:]):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    r = prepare("--input", str(tmp_path / "a.jsonl"), str(tmp_path / "txt"), "--text_field=body",
                f"--out_dir={tmp_path}/out", "--val_fraction=0.2", "--num_proc=2")
    assert r.returncode == 0, r.stderr
    assert sorted(documents(tmp_path / "out")) == sorted(docs)
    assert json.load(open(tmp_path / "out" / "meta.json"))["val"]["documents"] == 1


def test_rerun_is_safe_and_other_data_is_never_overwritten(tmp_path):
    out = f"--out_dir={tmp_path}/d"
    assert prepare("--demo", out).returncode == 0
    before = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    r = prepare("--demo", out)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    (tmp_path / "x.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    r = prepare("--input", str(tmp_path / "x.jsonl"), out)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path}/d already holds other data; pass --overwrite to replace it, or choose another --out_dir"]
    assert (tmp_path / "d" / "train.bin").stat().st_mtime_ns == before
    r = prepare("--input", str(tmp_path / "x.jsonl"), out, "--overwrite", "--val_fraction=0.5")
    assert r.returncode == 0 and sorted(documents(tmp_path / "d")) == ["one", "two"]


@pytest.mark.parametrize("case", ["missing", "corrupt jsonl", "wrong field", "empty", "blank documents", "one document"])
def test_bad_corpora_get_one_clear_error(tmp_path, case):
    f = tmp_path / "in.jsonl"
    content = {"missing": None, "corrupt jsonl": '{"text": "a"}\n{not json\n', "wrong field": '{"body": "a"}\n{"body": "b"}\n',
               "empty": "", "blank documents": '{"text": ""}\n{"text": ""}\n', "one document": '{"text": "only"}\n'}[case]
    if content is not None:
        f.write_text(content)
    r = prepare("--input", str(f), f"--out_dir={tmp_path}/out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error:"), r.stderr
    assert not (tmp_path / "out" / "train.bin").exists()


def test_unreadable_file(tmp_path):
    f = tmp_path / "locked.txt"
    f.write_text("secret")
    f.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make it unreadable another way
        f.unlink()
        f.symlink_to(tmp_path / "locked.txt")  # a link loop
    r = prepare("--input", str(f), f"--out_dir={tmp_path}/out")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "locked.txt" in r.stderr


def test_token_ids_beyond_uint16_are_refused(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"ids": [[1, 2, 70000]], "len": [3]})
    with pytest.raises(SystemExit):
        P.write_bin(ds, str(tmp_path / "train.bin"))
    assert P.write_bin(datasets.Dataset.from_dict({"ids": [[1, 65535]], "len": [2]}), str(tmp_path / "ok.bin")) == 2
    os.remove(tmp_path / "ok.bin.tmp")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("in.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": 5}\n', "record 3: field 'text' is 5 (int), not a string"),
    ("in.jsonl", '{"text": "a"}\n[1, 2]\n', "record 2 is a JSON list, not an object with a 'text' field"),
    ("in.jsonl", '{"text": "a"}\n{"text": null}\n', "record 2: field 'text' is null (NoneType), not a string"),
    ("in.jsonl", '{"text": "a"}\n{"body": "b"}\n', "record 2 has no field 'text' (fields: body); pass --text_field"),
    ("in.parquet", {"text": [1, 2]}, "record 1: field 'text' is int64, not a string"),
    ("in.parquet", {"text": ["a", "b", None, "d"]}, "record 3: field 'text' is null, not a string"),
])
def test_a_record_of_the_wrong_type_is_named_by_file_record_and_field(tmp_path, name, content, message):
    f = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table(content), f, row_group_size=2)
    else:
        f.write_text(content)
    r = prepare("--input", str(f), f"--out_dir={tmp_path}/out")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {f}: {message}"]
    assert not (tmp_path / "out").exists()


def test_compact_vocabulary_remaps_to_dense_ids_and_back(tmp_path):
    paths = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    original = [np.array([50256, 7, 300, 7, 50256], dtype=np.uint16), np.array([300, 12, 50256], dtype=np.uint16)]
    for p, a in zip(paths, original):
        a.tofile(p)
    id_map = P.compact_vocabulary(paths)
    assert id_map.tolist() == [7, 12, 300, 50256]
    compact = [np.fromfile(p, dtype=np.uint16) for p in paths]
    assert compact[0].tolist() == [3, 0, 2, 0, 3] and compact[1].tolist() == [2, 1, 3]
    assert all((id_map[c] == a).all() for c, a in zip(compact, original))


def test_stdlib_corpus_with_a_compact_vocabulary_round_trips(tmp_path):
    out = tmp_path / "stdlib"
    r = prepare("--stdlib", "--compact_vocab", f"--out_dir={out}", "--num_proc=1")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(out / "meta.json"))
    root, files = P.stdlib_files()
    assert meta["source"] == P.stdlib_source() and meta["stdlib"]["root"] == root
    kept = meta["stdlib"]["files"]
    assert kept == sorted(kept) and set(kept) <= set(files) and len(kept) > 0.95 * len(files)
    assert not any(f.startswith(("test/", "site-packages/")) for f in kept)
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(kept)
    assert meta["train"]["tokens"] > 4_000_000  # ~40x the demo corpus
    id_map = P.load_vocab_map(str(out))
    assert meta["vocab_size"] == len(id_map) and meta["vocab_map"]["model_vocab_size"] % 16 == 0
    assert meta["vocab_map"]["sha256"] == P._sha256_file(str(out / P.VOCAB_MAP))
    assert id_map[meta["eot_token"]] == P.EOT and (np.diff(id_map.astype(int)) > 0).all()
    enc = P.gpt2_tokenizer()
    texts = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert ids.max() < len(id_map) and meta[split]["sha256"] == P._sha256_file(str(out / f"{split}.bin"))
        gpt2 = id_map[ids]
        cuts = np.flatnonzero(gpt2 == P.EOT)
        texts += [enc.decode(gpt2[s:e].tolist()) for s, e in zip(np.concatenate([[0], cuts[:-1] + 1]), cuts)]
    originals = [open(os.path.join(root, f), encoding="utf-8").read().strip() for f in kept]
    assert sorted(texts) == sorted(originals)
    r = prepare("--stdlib", f"--out_dir={out}")  # the same corpus without the compact vocabulary is other data
    assert r.returncode == 2 and "already holds other data" in r.stderr
    r = prepare("--stdlib", "--compact_vocab", f"--out_dir={out}")
    assert r.returncode == 0 and "nothing to do" in r.stdout
