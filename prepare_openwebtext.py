"""
Tokenize a corpus with the GPT-2 BPE into uint16 memmaps for train.py:
    out_dir/train.bin, out_dir/val.bin   token ids, an EOT (50256) after every document
    out_dir/meta.json                    tokenizer, vocab size, counts, source, sha256 of each .bin
    out_dir/vocab_map.npy                with --compact_vocab: compact id -> GPT-2 id (see compact_vocabulary)

    python prepare_openwebtext.py                          # OpenWebText from the HF hub (~9.0B train tokens)
    python prepare_openwebtext.py --input a.jsonl dir/ …   # local .txt / .jsonl / .parquet files or folders
    python prepare_openwebtext.py --demo                   # small real-text corpus, no network at all
    python prepare_openwebtext.py --stdlib --compact_vocab # Python's standard library sources (~5.7M tokens), offline
    python prepare_openwebtext.py --fetch_tokenizer        # GPT-2 ranks from PyPI, for offline machines

Interrupted (kill -9, power cut) at any point, the same command again finishes the work or
starts it over, saying which; a meta.json always describes the files beside it (see commit()).

The GPT-2 tokenizer here (gpt2_tokenizer) is the one sample.py uses for prompts and samples;
train.py and bench/eval.py read the token ids written here and never tokenize.
"""
import argparse
import functools
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from configurator import fail, on_terminal, progress_bar, writable_dir, write_atomically

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
EOT = 50256
GPT2_VOCAB_SIZE = 50257
# tiktoken's r50k_base file holds exactly the GPT-2 ranks; openai-whisper's source
# distribution on PyPI ships a byte-identical copy (whisper/assets/gpt2.tiktoken).
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_FILE = os.environ.get("TWEO_GPT2_RANKS", os.path.join(REPO_ROOT, ".cache", "gpt2.tiktoken"))
WHISPER_SDIST = "openai-whisper==20250625"
OWT_HUB_ID = "Skylion007/openwebtext"
OWT_PARQUET = "hf://datasets/Skylion007/openwebtext@refs%2Fconvert%2Fparquet/plain_text/*/*.parquet"
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------------------
# The GPT-2 tokenizer

@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding. The local copy of the ranks (--fetch_tokenizer) is used
    first so that nothing touches the network; tiktoken verifies its sha256. Without it,
    tiktoken.get_encoding('gpt2') downloads. There is no fallback to any other tokenizer."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str

    if os.path.exists(GPT2_RANKS_FILE):
        ranks = tiktoken.load.load_tiktoken_bpe(GPT2_RANKS_FILE, expected_hash=GPT2_RANKS_SHA256)
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise RuntimeError(
            f"the GPT-2 tokenizer is not available: no local ranks at {GPT2_RANKS_FILE} and tiktoken "
            f"could not download them ({type(e).__name__}). Run `python prepare_openwebtext.py "
            f"--fetch_tokenizer` once (it takes them from PyPI), or set TWEO_GPT2_RANKS=/path/to/gpt2.tiktoken"
        ) from None


def fetch_tokenizer():
    """Put the GPT-2 ranks at GPT2_RANKS_FILE, taken from openai-whisper's sdist on PyPI."""
    if os.path.exists(GPT2_RANKS_FILE) and _sha256_file(GPT2_RANKS_FILE) == GPT2_RANKS_SHA256:
        print(f"GPT-2 ranks already at {GPT2_RANKS_FILE}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", WHISPER_SDIST, "-d", tmp]
        print("fetching the GPT-2 ranks:", " ".join(cmd[2:]))
        if subprocess.run(cmd).returncode != 0:
            fail(f"could not download {WHISPER_SDIST} from the package index (see pip's message above)")
        (tarball,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        with tarfile.open(tarball) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tf.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        fail(f"the gpt2.tiktoken in {WHISPER_SDIST} does not have the expected sha256 {GPT2_RANKS_SHA256}")
    write_atomically(GPT2_RANKS_FILE, data)
    print(f"GPT-2 ranks (sha256 {GPT2_RANKS_SHA256[:8]}…) written to {GPT2_RANKS_FILE}")


# ----------------------------------------------------------------------------------------
# Sources: each returns (datasets.Dataset with a "text" column, source description)

def demo_documents():
    """Python's own help topics (pydoc_data.topics): ~80 documents of real English prose
    about the language, present in every CPython install."""
    from pydoc_data.topics import topics
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


DEMO_SOURCE = "demo:pydoc_data.topics"


def load_demo():
    import datasets
    return datasets.Dataset.from_dict({"text": demo_documents()})


def stdlib_files():
    """(root, relative paths) of the standard library's own .py files, in sorted order: no
    tests, no site-packages, nothing generated. The same Python gives the same list."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        files += [os.path.relpath(os.path.join(d, f), root) for f in sorted(names) if f.endswith(".py")]
    return root, sorted(files)


def stdlib_source():
    return f"stdlib:python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def load_stdlib():
    """One document per source file of the running Python's standard library (code,
    docstrings and comments): a few million tokens of varied text any machine has."""
    import datasets
    root, files = stdlib_files()
    docs, kept = [], []
    for rel in files:
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue  # a few files are not UTF-8 (test data); they are left out, and listed out in meta.json
        if text:
            docs.append(text)
            kept.append(rel)
    return datasets.Dataset.from_dict({"text": docs}), {"root": root, "files": kept}


def local_files(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                           if os.path.splitext(f)[1] in LOCAL_BUILDERS)
            if not found:
                fail(f"no .txt, .jsonl or .parquet files under {path}")
            files += found
        elif not os.path.exists(path):
            fail(f"input {path} does not exist")
        elif os.path.splitext(path)[1] not in LOCAL_BUILDERS:
            fail(f"input {path}: expected a .txt, .jsonl or .parquet file (or a folder of them)")
        else:
            files.append(path)
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            fail(f"cannot read {f}: {e.strerror}")
    return files


def check_records(files, text_field):
    """Every record of every .jsonl / .parquet input is an object whose text field is a
    string, or the first one that is not is named: file, record number (from 1), field.
    .jsonl is read line by line; .parquet by its schema (a column has one type) and its
    row groups' null counts. Returns the files that hold any record: datasets cannot read a
    .jsonl or .parquet without one (a .txt is always one document, maybe empty)."""
    holding = []
    for path in files:
        ext = os.path.splitext(path)[1]
        if ext == ".jsonl":
            records = 0
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    records += 1
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        fail(f"{path}: record {n} is not JSON ({e.msg})")
                    if not isinstance(record, dict):
                        fail(f"{path}: record {n} is a JSON {type(record).__name__}, not an object with a '{text_field}' field")
                    if text_field not in record:
                        fail(f"{path}: record {n} has no field '{text_field}' (fields: {', '.join(record)}); pass --text_field")
                    if not isinstance(record[text_field], str):
                        fail(f"{path}: record {n}: field '{text_field}' is {json.dumps(record[text_field])[:40]} "
                             f"({type(record[text_field]).__name__}), not a string")
            if records:
                holding.append(path)
        elif ext == ".parquet":
            import pyarrow.parquet as pq
            try:
                schema = pq.read_schema(path)
            except Exception as e:
                fail(f"{path} is not a readable parquet file ({type(e).__name__})")
            if text_field not in schema.names:
                fail(f"{path}: record 1 has no field '{text_field}' (fields: {', '.join(schema.names)}); pass --text_field")
            kind = schema.field(text_field).type
            if str(kind) not in ("string", "large_string"):
                fail(f"{path}: record 1: field '{text_field}' is {kind}, not a string")
            parquet, before = pq.ParquetFile(path), 0
            column = parquet.schema_arrow.get_field_index(text_field)
            for group in range(parquet.metadata.num_row_groups):
                stats = parquet.metadata.row_group(group).column(column).statistics
                if stats is not None and stats.has_null_count and stats.null_count:
                    nulls = parquet.read_row_group(group, columns=[text_field]).column(0).is_null().to_pylist()
                    fail(f"{path}: record {before + nulls.index(True) + 1}: field '{text_field}' is null, not a string")
                before += parquet.metadata.row_group(group).num_rows
            if before:
                holding.append(path)
        else:
            holding.append(path)
    return holding


def local_source(files):
    return "local:" + ",".join(os.path.abspath(f) for f in files)


def load_local(files, text_field):
    """A .txt file is one document; .jsonl and .parquet hold one document per record. A
    document with nothing but whitespace is left out, as --demo and --stdlib leave them out:
    it would be a lone EOT, and an empty file is not a document."""
    import datasets
    parts = []
    for ext in sorted({os.path.splitext(f)[1] for f in files}):
        builder = LOCAL_BUILDERS[ext]
        group = [f for f in files if os.path.splitext(f)[1] == ext]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", **kwargs)
        except Exception as e:
            fail(f"could not read {ext} input ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        field = "text" if builder == "text" else text_field
        if field not in ds.column_names:
            fail(f"{ext} input has no field '{field}' (fields: {', '.join(ds.column_names)}); pass --text_field")
        parts.append(ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"]))
    ds = datasets.concatenate_datasets(parts)
    return ds.filter(lambda texts: [bool(t.strip()) for t in texts], input_columns="text", batched=True)


def load_openwebtext(num_proc):
    """OpenWebText from the hub. `load_dataset("openwebtext")` is a script dataset that
    datasets >= 4 no longer runs; the hub's parquet conversion of Skylion007/openwebtext is
    read instead."""
    import datasets
    try:
        ds = datasets.load_dataset("parquet", data_files={"train": OWT_PARQUET}, split="train", num_proc=num_proc)
    except Exception as e:
        fail(f"could not load {OWT_HUB_ID} from the Hugging Face hub ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}).\n"
             f"  If this machine is offline, download the parquet files elsewhere, e.g.\n"
             f"    huggingface-cli download {OWT_HUB_ID} --repo-type dataset --revision refs/convert/parquet --local-dir owt\n"
             f"  then run: python prepare_openwebtext.py --input owt/")
    if len(ds) < 7_900_000:
        print(f"warning: {len(ds):,} documents, OpenWebText has ~8.01M; the hub copy may be partial", file=sys.stderr)
    return ds


# ----------------------------------------------------------------------------------------
# Tokenize and write

def _sha256_file(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tokenize_batch(batch):
    enc = gpt2_tokenizer()
    ids = [enc.encode_ordinary(t) + [EOT] for t in batch["text"]]
    return {"ids": ids, "len": [len(x) for x in ids]}


def tokenize(ds, num_proc):
    return ds.map(_tokenize_batch, batched=True, batch_size=256, remove_columns=["text"],
                  desc=f"tokenizing ({num_proc} proc)", num_proc=num_proc if num_proc > 1 else None)


def write_bin(tokenized, path):
    """Write the ids as one uint16 memmap at path + '.tmp' and return the token count;
    the caller renames it once everything is complete, so that a file named train.bin is
    never half-written."""
    total = int(np.sum(tokenized["len"], dtype=np.int64))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if hasattr(os, "posix_fallocate"):
            # claim the space now: a full disk is then an OSError here, where writing
            # through the memmap would kill the process with SIGBUS and no word
            os.posix_fallocate(f.fileno(), 0, 2 * max(total, 1))
    arr = np.memmap(tmp, dtype=np.uint16, mode="r+", shape=(max(total, 1),))
    pos, n_shards = 0, min(1024, len(tokenized))
    for i in progress_bar(range(n_shards), desc=f"writing {os.path.basename(path)}"):
        ids = np.concatenate(tokenized.shard(n_shards, i, contiguous=True).with_format("numpy")["ids"])
        if ids.size and ids.max() >= 65536:
            del arr
            os.remove(tmp)
            fail(f"token id {int(ids.max())} does not fit in uint16", status=1)
        arr[pos:pos + len(ids)] = ids
        pos += len(ids)
    arr.flush()  # msync: the ids are on disk before their sha256 is taken and vouched for
    return total


VOCAB_MAP = "vocab_map.npy"


def compact_vocabulary(paths):
    """Remap the token ids of the given uint16 files (in place) to 0..K-1, K being the number
    of distinct ids they hold, in increasing order of GPT-2 id. Returns the map (uint16 [K]:
    compact id -> GPT-2 id). A model then needs a vocabulary of K (padded to a multiple of 16)
    instead of 50304, which makes the LM head of a small model several times cheaper."""
    arrays = [np.memmap(p, dtype=np.uint16, mode="r+") for p in paths]
    seen = np.zeros(1 << 16, dtype=bool)
    for a in arrays:
        seen[np.unique(a)] = True
    id_map = np.flatnonzero(seen).astype(np.uint16)
    for a in arrays:
        a[:] = np.searchsorted(id_map, a).astype(np.uint16)
        a.flush()
    return id_map


def load_vocab_map(data_dir):
    """The compact id -> GPT-2 id map of a --compact_vocab data folder, or None."""
    path = os.path.join(data_dir, VOCAB_MAP)
    return np.load(path) if os.path.exists(path) else None


# ----------------------------------------------------------------------------------------
# The files of a preparation, and what a kill leaves of them
#
# All the work is written under .tmp names and put in place by commit(), in this order:
#   1. meta.json.tmp holding the request (source, split): from here on, out_dir is marked as
#      an unfinished preparation;
#   2. train.bin.tmp, val.bin.tmp (and vocab_map.npy.tmp), then meta.json.tmp again, now with
#      their sha256s: from here on, a rerun can finish the work by renaming alone;
#   3. commit: the meta.json of the data being replaced (--overwrite) is removed, the .tmp
#      files are renamed, and meta.json.tmp becomes meta.json, last.
# So a meta.json always describes the files beside it, whatever moment a kill -9 picks, and
# what a kill leaves is told apart by existing_data() below.

META, PLAN = "meta.json", "meta.json.tmp"
SPLITS = ("train", "val")
# names that only this script's unfinished work leaves (vocab_map.npy.tmp.npy: an older version's)
LEFTOVERS = (PLAN, PLAN + ".tmp", "train.bin.tmp", "val.bin.tmp", VOCAB_MAP + ".tmp", VOCAB_MAP + ".tmp.npy")


def read_json(path):
    """The object in a JSON file, or None where the file is missing or not whole JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_request(meta, source, val_fraction, compact):
    return (meta.get("source") == source and meta.get("val_fraction") == val_fraction
            and ("vocab_map" in meta) == compact)


def vouched_files(meta):
    """(file name, sha256) of each data file that a meta.json, or a meta.json.tmp of step 2,
    vouches for; the sha256 is None where it holds none (a meta.json.tmp of step 1)."""
    files = [(f"{s}.bin", (meta.get(s) or {}).get("sha256")) for s in SPLITS]
    if "vocab_map" in meta:
        files.append((VOCAB_MAP, meta["vocab_map"].get("sha256")))
    return files


def matches(path, sha256):
    return sha256 is not None and os.path.isfile(path) and _sha256_file(path) == sha256


def remove(out_dir, names):
    for name in names:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def existing_data(out_dir, source, val_fraction, compact=False):
    """What out_dir holds, for a request of (source, val_fraction, compact): (state, detail).
      'none'        no data (maybe files that are none of this script's): detail None
      'same'        finished data of this request, every file of meta.json there, the .bin files of its sizes;
                    detail: the leftovers of an interrupted run beside it, to be removed
      'different'   finished data of another request, or a train.bin/val.bin without meta.json
                    (another tool's, or an older version's interrupted run); detail: why, or None
      'finish'      an interrupted preparation of this request whose files are all whole (they
                    match the sha256s of meta.json.tmp): detail: the .tmp files left to rename
      'start over'  an unfinished or damaged preparation of this script: detail: what was found
    """
    def here(name):
        return os.path.join(out_dir, name)
    leftovers = [n for n in LEFTOVERS if os.path.exists(here(n))]
    found = None
    if os.path.exists(here(META)):
        meta = read_json(here(META))
        if not isinstance(meta, dict):  # written whole or not at all by this script: someone else's
            return "different", f"{META} is not readable JSON"
        if not same_request(meta, source, val_fraction, compact):  # beside it maybe an interrupted --overwrite
            return "different", f"beside it, an unfinished preparation's {', '.join(leftovers)}" if leftovers else None
        # meta.json is put in place last (commit), so it vouches for its files: their sizes
        # suffice, where hashing would read all of OpenWebText (~18 GB) on every rerun
        sizes = {f"{s}.bin": 2 * (meta.get(s) or {}).get("tokens", -1) for s in SPLITS}
        bad = [name for name, _ in vouched_files(meta) if not os.path.isfile(here(name))
               or name in sizes and os.path.getsize(here(name)) != sizes[name]]
        if not bad:
            return "same", leftovers
        found = f"{bad[0]} does not have the size {META} gives it"
    plan = read_json(here(PLAN))
    if isinstance(plan, dict) and all(sha for _, sha in vouched_files(plan)):
        renames = []
        for name, sha in vouched_files(plan):
            if matches(here(name + ".tmp"), sha):
                renames.append(name + ".tmp")
            elif not matches(here(name), sha):
                break
        else:
            if same_request(plan, source, val_fraction, compact):
                return "finish", renames
            if found is None:  # whole, and one rename from finished: as good as other data
                return "different", f"an interrupted preparation of {plan.get('source')} that its own command would finish"
    if found is None:
        ours = [n for n in ("train.bin", "val.bin", VOCAB_MAP) if os.path.exists(here(n))]
        if not leftovers and VOCAB_MAP not in ours:
            if ours:
                return "different", f"{' and '.join(ours)} without {META}"
            return "none", None
        found = f"{', '.join(ours + leftovers)} without {META}"
    return "start over", found


def commit(out_dir, meta, renames):
    """Step 3 above: put the files of a preparation (meta.json.tmp holding their sha256s) in place."""
    remove(out_dir, [META])  # the data being replaced: out_dir claims no finished data until the last rename
    for tmp in renames:
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, tmp[:-len(".tmp")]))
    if "vocab_map" not in meta:
        remove(out_dir, [VOCAB_MAP])  # a compact vocabulary's map would mistranslate these ids
    os.replace(os.path.join(out_dir, PLAN), os.path.join(out_dir, META))


def summary(out_dir, meta):
    return (f"{out_dir}: train {meta['train']['documents']:,} documents, {meta['train']['tokens']:,} tokens; "
            f"val {meta['val']['documents']:,} documents, {meta['val']['tokens']:,} tokens"
            + (f"; compact vocabulary of {meta['vocab_size']:,} ids (vocab_size={meta['vocab_map']['model_vocab_size']})"
               if "vocab_map" in meta else ""))


def prepare(ds, source, out_dir, num_proc, val_fraction, seed=2357, compact=False, extra_meta=None):
    if len(ds) < 2:
        fail(f"the corpus has {len(ds)} document(s); a train/val split needs at least 2")
    split = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    split["val"] = split.pop("test")
    os.makedirs(out_dir, exist_ok=True)
    remove(out_dir, LEFTOVERS)  # an interrupted run's, which this one replaces
    meta = {"tokenizer": "gpt2", "tokenizer_ranks_sha256": GPT2_RANKS_SHA256, "vocab_size": GPT2_VOCAB_SIZE,
            "eot_token": EOT, "dtype": "uint16", "source": source, "val_fraction": val_fraction, "split_seed": seed}
    write_atomically(os.path.join(out_dir, PLAN), json.dumps(meta, indent=2).encode())
    paths = {name: os.path.join(out_dir, f"{name}.bin") for name in SPLITS}
    for name, path in paths.items():
        n_tokens = write_bin(tokenize(split[name], num_proc), path)
        if n_tokens <= len(split[name]):  # nothing but EOTs
            remove(out_dir, LEFTOVERS)
            fail(f"the {name} split holds no text: is the corpus empty?")
        meta[name] = {"documents": len(split[name]), "tokens": n_tokens}
    renames = [f"{name}.bin.tmp" for name in SPLITS]
    if compact:
        id_map = compact_vocabulary([p + ".tmp" for p in paths.values()])
        with open(os.path.join(out_dir, VOCAB_MAP + ".tmp"), "wb") as f:
            np.save(f, id_map)
            f.flush()
            os.fsync(f.fileno())
        renames.append(VOCAB_MAP + ".tmp")
        meta.update(vocab_size=len(id_map), eot_token=int(np.searchsorted(id_map, EOT)),
                    vocab_map={"file": VOCAB_MAP, "gpt2_vocab_size": GPT2_VOCAB_SIZE, "gpt2_eot_token": EOT,
                               "sha256": _sha256_file(os.path.join(out_dir, VOCAB_MAP + ".tmp")),
                               "model_vocab_size": -(-len(id_map) // 16) * 16})
    for name, path in paths.items():
        meta[name]["sha256"] = _sha256_file(path + ".tmp")
    meta.update(extra_meta or {})
    write_atomically(os.path.join(out_dir, PLAN), json.dumps(meta, indent=2).encode())
    commit(out_dir, meta, renames)
    print(summary(out_dir, meta))
    return meta


def corpus_names(paths):
    return ", ".join(paths) if len(paths) <= 3 else f"{paths[0]} and {len(paths) - 1} other inputs"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None,
                   help="default: data/openwebtext, data/demo with --demo, data/stdlib with --stdlib, data/local with --input")
    p.add_argument("--input", nargs="+", metavar="PATH", help="local .txt/.jsonl/.parquet files or folders instead of the hub")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl/.parquet records (default: text)")
    p.add_argument("--demo", action="store_true", help="build the embedded demo corpus (no network)")
    p.add_argument("--stdlib", action="store_true", help="build a corpus from the standard library's sources (no network)")
    p.add_argument("--compact_vocab", action="store_true",
                   help="remap the corpus's distinct token ids to 0..K-1 (vocab_map.npy; set vocab_size to K padded to 16)")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tokenizer processes")
    p.add_argument("--val_fraction", type=float, default=None, help="default 0.0005 (nanoGPT), 0.1 for --demo")
    p.add_argument("--overwrite", action="store_true", help="replace data from a different source in out_dir")
    p.add_argument("--fetch_tokenizer", action="store_true", help="download the GPT-2 ranks from PyPI and exit")
    args = p.parse_args(argv)

    if not on_terminal():
        # datasets' and the hub's own bars, quiet where configurator.progress_bar is
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.fetch_tokenizer:
        return fetch_tokenizer()
    if sum(map(bool, (args.demo, args.stdlib, args.input))) > 1:
        fail("--demo, --stdlib and --input exclude each other")
    if args.num_proc < 1:
        fail("--num_proc must be at least 1")
    val_fraction = args.val_fraction if args.val_fraction is not None else (
        0.1 if args.demo else 0.02 if args.stdlib else 0.0005)
    if not 0 < val_fraction < 1:
        fail("--val_fraction must be between 0 and 1")
    out_dir = args.out_dir or os.path.join(
        "data", "demo" if args.demo else "stdlib" if args.stdlib else "local" if args.input else "openwebtext")
    if not writable_dir(out_dir):
        blocker = os.path.abspath(out_dir)
        while not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        fail(f"cannot write to --out_dir {out_dir}: {blocker} is "
             + ("not writable" if os.path.isdir(blocker) else "a file, not a folder"))
    try:
        gpt2_tokenizer()  # fail now, not after the download
    except RuntimeError as e:
        fail(str(e))

    if args.demo:
        source = DEMO_SOURCE
    elif args.stdlib:
        source = stdlib_source()
    elif args.input:
        files = local_files(args.input)
        holding = check_records(files, args.text_field)
        if not holding:
            fail(f"the corpus in {corpus_names(args.input)} holds no text (no records)")
        source = local_source(files)
    else:
        source = f"hub:{OWT_HUB_ID}"
    state, detail = existing_data(out_dir, source, val_fraction, args.compact_vocab)
    if state == "different" and not args.overwrite:
        fail(f"{out_dir} already holds other data{f' ({detail})' if detail else ''}; "
             f"pass --overwrite to replace it, or choose another --out_dir")
    if state == "same" and detail:
        remove(out_dir, detail)
        print(f"note: removed the leftovers of an interrupted preparation from {out_dir}: {', '.join(detail)}",
              file=sys.stderr)
    if state == "same" and not args.overwrite:
        print(f"{out_dir} already holds this data (meta.json); nothing to do")
        return
    if state == "finish":
        left = f"{', '.join(detail)} to rename" if detail else f"only {META} to put in place"
        print(f"note: {out_dir} holds an interrupted preparation whose files are all whole ({left}): finishing it",
              file=sys.stderr)
        meta = read_json(os.path.join(out_dir, PLAN))
        commit(out_dir, meta, detail)
        print(summary(out_dir, meta))
        return

    extra_meta = None
    if args.stdlib:
        ds, files_used = load_stdlib()
        extra_meta = {"stdlib": files_used}
    elif args.input:
        ds = load_local(holding, args.text_field)
    else:
        ds = load_demo() if args.demo else load_openwebtext(args.num_proc)
    if len(ds) < 2:
        what = f"the corpus in {corpus_names(args.input)}" if args.input else "the corpus"
        fail(f"{what} holds no text (every document is empty or whitespace)" if len(ds) == 0 else
             f"{what} has 1 document with text; a train/val split needs at least 2")
    if state == "start over":
        print(f"note: {out_dir} holds an unfinished preparation ({detail}): starting over", file=sys.stderr)
        remove(out_dir, [META, "train.bin", "val.bin", VOCAB_MAP])
    try:
        prepare(ds, source, out_dir, args.num_proc, val_fraction, compact=args.compact_vocab, extra_meta=extra_meta)
    except OSError as e:  # a full disk, say; a rerun starts over (meta.json.tmp marks the work unfinished)
        fail(f"preparing {out_dir} failed: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}", status=1)


if __name__ == "__main__":
    main()
