"""prepare_openwebtext.py: round trips of real corpora, the offline GPT-2 tokenizer, safety."""
import json
import os
import random
import shutil
import subprocess
import sys
import time

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


def test_demo_corpus_round_trips(demo_data):
    meta = json.load(open(os.path.join(demo_data, "meta.json")))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["source"] == "demo:pydoc_data.topics"
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(P.demo_documents())
    for split in ("train", "val"):
        path = os.path.join(demo_data, f"{split}.bin")
        assert os.path.getsize(path) == 2 * meta[split]["tokens"] and meta[split]["sha256"] == P._sha256_file(path)
    assert sorted(documents(demo_data)) == sorted(P.demo_documents())
    assert sorted(os.listdir(demo_data)) == ["meta.json", "train.bin", "val.bin"]


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


NO_TEXT = "(every document is empty or whitespace)"


@pytest.mark.parametrize("name, content, message", [
    ("in.jsonl", None, "input {f} does not exist"),
    ("in.jsonl", '{"text": "a"}\n{not json\n', "{f}: record 2 is not JSON (Expecting property name enclosed in double quotes)"),
    ("in.jsonl", '{"body": "a"}\n{"body": "b"}\n', "{f}: record 1 has no field 'text' (fields: body); pass --text_field"),
    ("in.jsonl", "", "the corpus in {f} holds no text (no records)"),
    ("in.jsonl", "\n\n", "the corpus in {f} holds no text (no records)"),
    ("in.jsonl", '{"text": ""}\n{"text": " \\n\\t "}\n', "the corpus in {f} holds no text " + NO_TEXT),
    ("in.txt", "", "the corpus in {f} holds no text " + NO_TEXT),
    ("in.txt", "  \n\t\n", "the corpus in {f} holds no text " + NO_TEXT),
    ("in.jsonl", '{"text": "only"}\n{"text": ""}\n',
     "the corpus in {f} has 1 document with text; a train/val split needs at least 2"),
])
def test_bad_corpora_get_one_clear_error(tmp_path, name, content, message):
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    r = prepare("--input", str(f), f"--out_dir={tmp_path}/out")
    assert r.returncode == 2 and r.stderr.splitlines() == ["error: " + message.format(f=f)] and r.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["afile/d", "afile"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, out):
    (tmp_path / "afile").write_text("not a folder")
    r = prepare("--demo", f"--out_dir={tmp_path / out}")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.splitlines() == [
        f"error: cannot write to --out_dir {tmp_path / out}: {tmp_path}/afile is a file, not a folder"]
    assert os.listdir(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "not a folder"


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


def test_stdlib_corpus_with_a_compact_vocabulary_round_trips(stdlib_data):
    from pathlib import Path
    out = Path(stdlib_data)  # prepare_openwebtext.py --stdlib --compact_vocab --num_proc=1, shared with other tests
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin", P.VOCAB_MAP]
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


# ----------------------------------------------------------------------------------------
# Interrupted preparations: what a kill -9 leaves at each step of prepare() and commit(),
# built as files from a finished preparation, then one real kill at a random moment

def files(d):
    """name -> sha256 of every file in a folder: 'the same data' is this, byte for byte."""
    return {name: P._sha256_file(os.path.join(d, name)) for name in sorted(os.listdir(d))}


def request_only(d):
    """meta.json.tmp as prepare() writes it first: the request, before any file exists."""
    meta = json.load(open(d / "meta.json"))
    (d / "meta.json.tmp").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("train", "val")}))


def killed_while_writing_train_bin(d):
    request_only(d)
    ids = (d / "train.bin").read_bytes()
    half = len(ids) // 2
    (d / "train.bin.tmp").write_bytes(ids[:half] + bytes(len(ids) - half))  # a memmap: full size, half written
    for name in ("train.bin", "val.bin", "meta.json"):
        os.remove(d / name)


def killed_before_the_sha256s_were_written(d):
    request_only(d)
    (d / "meta.json.tmp.tmp").write_text((d / "meta.json").read_text()[:100])  # the rewrite, cut short
    os.rename(d / "train.bin", d / "train.bin.tmp")
    os.rename(d / "val.bin", d / "val.bin.tmp")
    os.remove(d / "meta.json")


def killed_between_the_renames(d):
    os.rename(d / "val.bin", d / "val.bin.tmp")
    os.rename(d / "meta.json", d / "meta.json.tmp")


def killed_before_meta_json_was_put_in_place(d):
    os.rename(d / "meta.json", d / "meta.json.tmp")


def killed_while_replacing_other_data(d):
    # --overwrite of other data: its meta.json already gone, its .bin files not yet replaced
    for split in ("train", "val"):
        os.rename(d / f"{split}.bin", d / f"{split}.bin.tmp")
        (d / f"{split}.bin").write_bytes(b"\x01\x00" * 1000)
    os.rename(d / "meta.json", d / "meta.json.tmp")


def leftovers_beside_finished_data(d):
    request_only(d)
    (d / "train.bin.tmp").write_bytes(b"\x00" * 100)


def an_older_version_killed_between_the_renames(d):  # it renamed both .bin files before writing meta.json
    os.rename(d / "val.bin", d / "val.bin.tmp")
    os.remove(d / "meta.json")


def an_older_version_killed_after_its_vocab_map(d):  # with --compact_vocab it put vocab_map.npy in place first
    np.save(d / "vocab_map.npy", np.arange(10, dtype=np.uint16))
    os.rename(d / "train.bin", d / "train.bin.tmp")
    os.rename(d / "val.bin", d / "val.bin.tmp")
    os.remove(d / "meta.json")


def a_truncated_train_bin(d):
    with open(d / "train.bin", "r+b") as f:
        f.truncate(100)


UNFINISHED = "{d} holds an unfinished preparation (%s without meta.json): starting over"
WHOLE = "{d} holds an interrupted preparation whose files are all whole (%s): finishing it"
INTERRUPTED = {
    killed_while_writing_train_bin: UNFINISHED % "meta.json.tmp, train.bin.tmp",
    killed_before_the_sha256s_were_written: UNFINISHED % "meta.json.tmp, meta.json.tmp.tmp, train.bin.tmp, val.bin.tmp",
    killed_between_the_renames: WHOLE % "val.bin.tmp to rename",
    killed_before_meta_json_was_put_in_place: WHOLE % "only meta.json to put in place",
    killed_while_replacing_other_data: WHOLE % "train.bin.tmp, val.bin.tmp to rename",
    leftovers_beside_finished_data: "removed the leftovers of an interrupted preparation from {d}: meta.json.tmp, train.bin.tmp",
    an_older_version_killed_between_the_renames: UNFINISHED % "train.bin, val.bin.tmp",
    an_older_version_killed_after_its_vocab_map: UNFINISHED % "vocab_map.npy, train.bin.tmp, val.bin.tmp",
    a_truncated_train_bin: "{d} holds an unfinished preparation (train.bin does not have the size meta.json gives it): starting over",
}


@pytest.mark.parametrize("interrupt, note", INTERRUPTED.items(), ids=[f.__name__ for f in INTERRUPTED])
def test_a_rerun_after_a_kill_finishes_or_starts_over_to_the_same_data(demo_data, tmp_path, interrupt, note):
    d = tmp_path / "demo"
    shutil.copytree(demo_data, d)
    interrupt(d)
    r = prepare("--demo", f"--out_dir={d}")
    assert r.returncode == 0 and r.stderr.splitlines() == ["note: " + note.format(d=d)], r.stderr
    assert files(d) == files(demo_data)


class Killed(Exception):
    pass


def test_a_kill_between_any_two_steps_of_commit_leaves_data_that_a_rerun_finishes(demo_data, tmp_path, monkeypatch):
    """commit() replacing other data (--overwrite) stopped before each of its removes and renames
    in turn: out_dir then holds finished data, either the old or the new, or the new one a
    rerun can finish; never a meta.json beside files it does not describe."""
    reference, meta = files(demo_data), json.load(open(os.path.join(demo_data, "meta.json")))
    step, kill_at = 0, 0

    def stoppable(op):
        def run(*args):
            nonlocal step
            if step == kill_at:
                raise Killed
            step += 1
            return op(*args)
        return run
    for kill_at in range(6):  # 5 steps: remove meta.json, 2 renames, remove vocab_map.npy, rename meta.json.tmp
        d, step = tmp_path / str(kill_at), 0
        d.mkdir()
        for name in ("train.bin", "val.bin"):
            shutil.copy(os.path.join(demo_data, name), d / (name + ".tmp"))
            (d / name).write_bytes(b"\x01\x00" * 1000)
        (d / "meta.json").write_text(json.dumps({"source": "local:/other", "val_fraction": 0.5}))
        (d / "vocab_map.npy").write_bytes(b"an other corpus's compact vocabulary")
        shutil.copy(os.path.join(demo_data, "meta.json"), d / "meta.json.tmp")
        with monkeypatch.context() as m:
            m.setattr(P.os, "replace", stoppable(os.replace))
            m.setattr(P.os, "remove", stoppable(os.remove))
            try:
                P.commit(str(d), meta, ["train.bin.tmp", "val.bin.tmp"])
                assert kill_at == 5
            except Killed:
                pass
        state, detail = P.existing_data(str(d), P.DEMO_SOURCE, 0.1)
        if kill_at == 0:
            assert state == "different"  # the other data, whole: a rerun needs --overwrite
            continue
        if state == "finish":
            P.commit(str(d), meta, detail)
        else:
            assert kill_at == 5 and state == "same"
        assert files(d) == reference


def test_train_bin_without_meta_json_or_a_whole_preparation_of_other_data_is_not_overwritten(demo_data, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    d = tmp_path / "d"
    shutil.copytree(demo_data, d)
    os.remove(d / "meta.json")  # an older version's kill, or nanoGPT's own prepare.py: nothing says what they hold
    for cmd in (["--demo"], ["--input", str(tmp_path / "x.jsonl")]):
        r = prepare(*cmd, f"--out_dir={d}")
        assert r.returncode == 2 and r.stderr.splitlines() == [
            f"error: {d} already holds other data (train.bin and val.bin without meta.json); "
            f"pass --overwrite to replace it, or choose another --out_dir"]
    shutil.rmtree(d)
    shutil.copytree(demo_data, d)
    killed_between_the_renames(d)  # one rename from finished demo data
    before = files(d)
    r = prepare("--input", str(tmp_path / "x.jsonl"), f"--out_dir={d}")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: {d} already holds other data (an interrupted preparation of demo:pydoc_data.topics that its own command "
        f"would finish); pass --overwrite to replace it, or choose another --out_dir"]
    assert files(d) == before


def test_a_real_kill_9_then_a_rerun_gives_the_data_of_an_uninterrupted_run(stdlib_data, tmp_path):
    out = tmp_path / "stdlib"
    args = ["--stdlib", "--compact_vocab", f"--out_dir={out}", "--num_proc=1"]  # as stdlib_data was made
    proc = subprocess.Popen([sys.executable, "prepare_openwebtext.py", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "meta.json.tmp").exists() and time.time() < deadline:  # the work has begun
        time.sleep(0.02)
    time.sleep(random.uniform(0, 1))  # tokenizing the train split takes 3-4 s more on a 2-core Xeon
    assert proc.poll() is None, "it finished before the kill: sleep less"
    proc.kill()
    proc.wait()
    assert not (out / "meta.json").exists()
    r = prepare(*args)
    assert r.returncode == 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"note: {out} holds an ") and r.stderr.rstrip().endswith(("starting over", "finishing it"))
    assert files(out) == files(stdlib_data)
