"""
Plant one typical bug at a time in a module and count how many its test file catches.

    python tools/mutate.py MODULE.py TEST_FILE [--functions=a,B.b] [--timeout=S] [--list]

Bugs: + <-> -, * <-> /, // -> *, ** -> *, % -> //; < <-> <=, > <-> >=, == <-> !=, is <-> is not,
in <-> not in; an integer constant n -> n + 1; a float x -> 2x (0.0 -> 1.0); and <-> or; a unary
minus or `not` dropped. Only inside the named functions or classes (names, or Class.method), else anywhere
in the module; f-strings (message text) are left alone. Each mutant is written over the module
in a temporary copy of the repository (git's tracked and untracked, not ignored, files, with
.venv, .cache and data symlinked), where `python -m pytest -x -q TEST_FILE` runs; a mutant is
killed when the tests fail or time out. The worktree itself is never written.
"""
import argparse
import ast
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from configurator import fail

OPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
       ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
CMPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
LINKED = (".venv", ".cache", "data")
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def bugs(node):
    """The mutants of one node, as replacement nodes."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in OPS:
        new = copy.copy(node)
        new.op = OPS[type(node.op)]()
        yield new
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMPS:
                new = copy.copy(node)
                new.ops = node.ops[:i] + [CMPS[type(op)]()] + node.ops[i + 1:]
                yield new
    elif isinstance(node, ast.BoolOp):
        new = copy.copy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield new
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        yield node.operand
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        yield ast.Constant(node.value + 1 if type(node.value) is int else (node.value * 2 or 1.0))


def sites(tree, functions):
    """Every (parent, field, index, node, function name) where a bug can go, in a fixed order."""
    def walk(node, qualname, inside):
        for field, value in ast.iter_fields(node):
            for index, child in (enumerate(value) if isinstance(value, list) else [(None, value)]):
                if not isinstance(child, ast.AST) or isinstance(child, ast.JoinedStr):
                    continue
                name, here = qualname, inside
                if isinstance(child, DEFS):
                    name = f"{qualname}.{child.name}" if qualname else child.name
                    here = inside or functions is None or child.name in functions or name in functions
                if here:
                    yield node, field, index, child, name or "<module>"
                yield from walk(child, name, here)
    return walk(tree, "", functions is None)


def mutants(source, functions):
    """(line, function, before, after, mutated source) for every bug, one at a time."""
    count = sum(1 for *_, child, _ in sites(ast.parse(source), functions) for _ in bugs(child))
    for k in range(count):
        tree = ast.parse(source)  # a fresh tree each time: planting a bug edits it
        flat = ((p, f, i, c, n, b) for p, f, i, c, n in sites(tree, functions) for b in bugs(c))
        parent, field, index, child, name, bug = next(x for j, x in enumerate(flat) if j == k)
        shown = parent if isinstance(parent, ast.UnaryOp) else child  # -1 -> -2, not 1 -> 2
        before = ast.unparse(shown)
        if index is None:
            setattr(parent, field, bug)
        else:
            getattr(parent, field)[index] = bug
        yield child.lineno, name, before, ast.unparse(bug if shown is child else parent), ast.unparse(tree)


def run_tests(repo, test_file, timeout):
    """True when the tests pass within the timeout."""
    # a stale .pyc must never stand in for a mutant; and the copy's modules, not those that the
    # editable install in the linked .venv points to, must be the ones imported (scripts in bench/ too)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_file],
                         cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        return p.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        return False
    finally:  # timed out, or this script stopped: the whole group, tests may have started subprocesses
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def copy_repo(root, dest):
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if os.path.isfile(os.path.join(root, f)):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(root, f), os.path.join(dest, f))
    for name in LINKED:
        if os.path.exists(os.path.join(root, name)) and not os.path.exists(os.path.join(dest, name)):
            os.symlink(os.path.realpath(os.path.join(root, name)), os.path.join(dest, name))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("module")
    ap.add_argument("test_file")
    ap.add_argument("--functions", help="comma-separated names of functions, classes or Class.method (default: all)")
    ap.add_argument("--timeout", type=float, help="seconds per mutant (default: 3x the unmutated run + 10)")
    ap.add_argument("--list", action="store_true", help="print the mutants without running anything")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stop still removes the temporary copy
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=os.path.dirname(os.path.abspath(args.module)),
                          capture_output=True, text=True).stdout.strip()
    functions = set(args.functions.split(",")) if args.functions else None
    problem = (not args.module.endswith(".py") or not os.path.isfile(args.module)) and f"no module {args.module}"
    problem = problem or (not root and f"{args.module} is not in a git repository")
    problem = problem or (not os.path.isfile(args.test_file.split("::")[0]) and f"no test file {args.test_file}")
    source = "" if problem else open(args.module).read()
    if not problem and functions:
        defined = {q for *_, c, q in sites(ast.parse(source), None) if isinstance(c, DEFS)}
        missing = sorted(f for f in functions if f not in defined and not any(q.endswith("." + f) for q in defined))
        problem = missing and f"{args.module} defines no function or class {', '.join(missing)}"
    if problem or (args.timeout is not None and args.timeout <= 0):
        fail(problem or "--timeout must be positive")
    if args.list:
        for line, name, before, after, _ in mutants(source, functions):
            print(f"L{line} {name}: {before[:60]} -> {after[:60]}")
        return
    module = os.path.relpath(os.path.abspath(args.module), root)
    test_file = os.path.relpath(os.path.abspath(args.test_file.split("::")[0]), root) + args.test_file[len(args.test_file.split("::")[0]):]
    with tempfile.TemporaryDirectory(prefix="mutate_") as repo:
        copy_repo(root, repo)
        t0 = time.time()
        if not run_tests(repo, test_file, None):
            fail(f"{test_file} fails on the unmutated {module}: fix that first")
        timeout = args.timeout or 3 * (time.time() - t0) + 10
        print(f"unmutated: {test_file} passes in {time.time() - t0:.1f} s; timeout {timeout:.0f} s per mutant", flush=True)
        killed, survivors = 0, []
        for line, name, before, after, mutated in mutants(source, functions):
            with open(os.path.join(repo, module), "w") as f:
                f.write(mutated)
            survived = run_tests(repo, test_file, timeout)
            killed += not survived
            report = f"L{line} {name}: {before[:60]} -> {after[:60]}"
            survivors += [report] if survived else []
            print(f"{report}  {'SURVIVED' if survived else 'killed'}", flush=True)
    n = killed + len(survivors)
    print(f"\n{module} with {test_file}: killed {killed}/{n} ({100 * killed / max(n, 1):.1f}%)")
    for s in survivors:
        print(f"  survived: {s}")


if __name__ == "__main__":
    main()
