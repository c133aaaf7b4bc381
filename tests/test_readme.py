"""README.md and docs/ say what the code does: the table of config keys (docs/config.md) is train.py's,
and the README's numbers are the scripts'."""
import ast
import os
import re
import subprocess
import sys

from conftest import REPO

from configurator import declared_keys
from tools import config_table


def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def config_doc():
    with open(config_table.CONFIG_DOC) as f:
        return f.read()


def train_py_defaults(path):
    """train.py's config keys and defaults as train.py itself computes them: its source run up to
    the line that collects config_keys (imports and assignments only, nothing else happens there)."""
    with open(path) as f:
        source = f.read()
    namespace = {"__name__": "train_defaults"}
    exec(compile(source[:source.index("\nconfig_keys = ")], path, "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def test_the_table_lists_exactly_train_pys_keys_and_defaults():
    rows = config_table.rows()
    assert {key: ast.literal_eval(default) for _, key, default, _ in rows} == train_py_defaults(config_table.TRAIN)
    assert [key for _, key, _, meaning in rows if not meaning] == []  # every key documented
    commented = {key for _, key, _, comment in declared_keys(config_table.TRAIN) if comment}
    assert not set(config_table.MEANINGS) - ({key for _, key, _, _ in rows} - commented)  # no stale entry


def test_docs_config_md_holds_the_current_table():
    text = config_doc()
    assert config_table.with_table(text) == text, "docs/config.md's table is stale: python tools/config_table.py --write"
    assert config_table.table() in text


def test_a_new_key_without_a_meaning_is_caught(tmp_path):
    with open(config_table.TRAIN) as f:
        source = f.read()
    new_train = tmp_path / "train.py"
    new_train.write_text(source.replace("seed = 1337\n", "seed = 1337\neval_windows = 64\n", 1))
    rows = config_table.rows(str(new_train))
    assert ("run", "eval_windows", "64", None) in rows
    assert config_table.with_table(config_doc(), str(new_train)) != config_doc()  # the table test would fail
    new_train.write_text(source.replace("seed = 1337\n", "seed = 1337\neval_windows = 64  # val windows\n", 1))
    assert ("run", "eval_windows", "64", "val windows") in config_table.rows(str(new_train))


def test_the_script_prints_the_table_and_refuses_other_arguments():
    r = subprocess.run([sys.executable, "tools/config_table.py"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == config_table.table()
    r = subprocess.run([sys.executable, "tools/config_table.py", "--wrte"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: usage") and r.stdout == ""


def test_the_demo_length_the_readme_gives_is_demo_pys():
    from bench.demo import MAX_ITERS
    assert re.search(r"make demo DEMO_ITERS=400` trains a longer demo of its own \(default (\d+),", readme()).group(1) \
        == str(MAX_ITERS)
