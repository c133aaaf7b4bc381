"""tools/mutate.py on a toy repository: the mutants its test covers die, those of an untested function
survive, a mutant that loops forever dies by the timeout, and the module itself is never written."""
import os
import subprocess
import sys

from conftest import REPO

TOY = """\
def add_capped(a, b):
    return min(a + b, 10)


def count_to(n):
    i = 0
    while i < n:
        i += 1
    return i


def untested(x):
    return x * 2
"""

TOY_TEST = """\
from toy import add_capped, count_to


def test_add_capped():
    assert add_capped(2, 3) == 5
    assert add_capped(9, 9) == 10


def test_count_to():
    assert count_to(3) == 3
"""


def toy_repo(tmp_path):
    (tmp_path / "toy.py").write_text(TOY)
    (tmp_path / "test_toy.py").write_text(TOY_TEST)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def mutate(repo, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "mutate.py"), "toy.py", "test_toy.py", *args],
                          cwd=repo, capture_output=True, text=True, timeout=300)


def test_kills_the_covered_mutants_and_reports_the_untested_function(tmp_path):
    repo = toy_repo(tmp_path)
    r = mutate(repo, "--timeout=5")
    assert r.returncode == 0, r.stderr
    verdicts = {line.rsplit("  ", 1)[0]: line.rsplit("  ", 1)[1] for line in r.stdout.splitlines() if line.startswith("L")}
    assert verdicts == {
        "L2 add_capped: a + b -> a - b": "killed",
        "L2 add_capped: 10 -> 11": "killed",
        "L6 count_to: 0 -> 1": "SURVIVED",  # equivalent for n >= 1: the test cannot tell
        "L7 count_to: i < n -> i <= n": "killed",
        "L8 count_to: i += 1 -> i -= 1": "killed",  # loops forever: killed by the timeout
        "L8 count_to: 1 -> 2": "killed",
        "L13 untested: x * 2 -> x / 2": "SURVIVED",
        "L13 untested: 2 -> 3": "SURVIVED",
    }
    assert "toy.py with test_toy.py: killed 5/8 (62.5%)" in r.stdout
    assert (repo / "toy.py").read_text() == TOY


def test_functions_restricts_the_mutants(tmp_path):
    r = mutate(toy_repo(tmp_path), "--functions=add_capped")
    assert r.returncode == 0, r.stderr
    assert "killed 2/2 (100.0%)" in r.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    repo = toy_repo(tmp_path)
    r = mutate(repo, "--functions=nope")
    assert (r.returncode, r.stderr) == (2, "error: toy.py defines no function or class nope\n")
    (repo / "test_toy.py").write_text(TOY_TEST.replace("== 5", "== 6"))
    r = mutate(repo)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fails on the unmutated toy.py" in r.stderr
