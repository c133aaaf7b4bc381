"""
nanoGPT-style configuration: config files are exec'd in order, then --key=value overrides
are applied. Every key must already exist in `defaults` (train.py's globals, say) and keep
its type; anything else is a ConfigError naming the closest valid key.

    python train.py configs/gpt2_xl_fp8_tweo.py --learning_rate=3e-4 --wandb_log=True
    python bench/eval.py --out_dir=out/run --json          (a bare --flag sets a bool key to True)

A config file is plain Python: assignments, and `from configs.sizes.xl import *` to share
settings. Names starting with an underscore and imported modules are ignored.

Types are checked here; ranges by each script's own table of rules, rows of
(key, test(value), what the value must be), read top to bottom by first_violation().
"""
import ast
import difflib
import os
import sys
import types


class ConfigError(Exception):
    pass


def _closest(key, known):
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _checked(key, value, defaults, where):
    if key not in defaults:
        raise ConfigError(f"unknown config key '{key}' in {where}{_closest(key, list(defaults))}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be {type(default).__name__}, got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(default)):
        raise ConfigError(f"{where}: '{key}' must be {type(default).__name__}, got {type(value).__name__} {value!r}")
    return value


def configure(defaults, argv):
    """Returns a new dict: defaults updated by the config files and --key=value items in argv."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found")
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), namespace)
            except Exception as e:
                raise ConfigError(f"config file '{arg}' failed: {type(e).__name__}: {e}") from e
            for key, value in namespace.items():
                if key.startswith("_") or isinstance(value, types.ModuleType):
                    continue
                config[key] = _checked(key, value, defaults, arg)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep and isinstance(defaults.get(key), bool):
                sep, text = "=", "True"  # a bare --flag sets a bool key
            if not sep:
                raise ConfigError(f"'{arg}': overrides are written --key=value")
            if key not in defaults:
                raise ConfigError(f"unknown config key '{key}' in '{arg}'{_closest(key, list(defaults))}")
            if isinstance(defaults[key], str):
                value = text  # strings need no quotes on the command line
            else:
                try:
                    value = ast.literal_eval(text)
                except (SyntaxError, ValueError):
                    raise ConfigError(f"'{arg}': cannot read {text!r} as a {type(defaults[key]).__name__}") from None
            config[key] = _checked(key, value, defaults, f"'{arg}'")
    return config


def fail(msg, status=2):
    """How every script stops: one line on stderr and exit status 2 for bad input (found before
    any work), 1 for a fault during the work; never a traceback for either."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(status)


def on_terminal():
    """Progress bars only where a person watches: stderr a terminal, and not CI (CI=...). In a
    file or a pipe a bar's carriage returns are noise in the log."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(iterable=None, **tqdm_kwargs):
    """tqdm on stderr on a terminal (on_terminal), none elsewhere."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not on_terminal(), **tqdm_kwargs)


def one_of(*values):
    """A rule for an enumeration: the exact value, case included (the same rule in every script)."""
    return (lambda v: v in values), "one of " + ", ".join(map(repr, values))


def writable_dir(path):
    """path is a directory this process can write, or can be created as one."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def writable_file(path):
    """path can be written as a file: not a directory, in a directory this process can write or create."""
    return not os.path.isdir(path) and writable_dir(os.path.dirname(os.path.abspath(path)))


def usable_device(name):
    """'cpu', or 'cuda' / 'cuda:N' on a machine with that GPU."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu"


def first_violation(config, rules):
    """The first rule in `rules` that config breaks, as one line, or None. A rule is
    (key, test(value) -> bool, what the value must be: text, or a callable giving it)."""
    for key, test, must in rules:
        if not test(config[key]):
            return f"{key}={config[key]!r} must be {must() if callable(must) else must}"
    return None


def configure_or_exit(defaults, argv):
    """configure(), turning a ConfigError into one line on stderr and exit status 2."""
    try:
        return configure(defaults, argv)
    except ConfigError as e:
        fail(str(e))


def declared_keys(path):
    """The config keys a script declares as globals between its first two `# ---` rule lines
    (train.py's block of defaults), read without running it: a list of (section, key,
    default as written, the comment on its line or ''), section being the last comment line
    above the key. For the README's table of keys (tools/config_table.py)."""
    import io
    import tokenize
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("# ---")][:2]
    if len(rules) < 2:
        raise ConfigError(f"{path} has no block of defaults between two '# ---' lines")
    block = "\n".join(lines[rules[0] + 1:rules[1]]) + "\n"
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(block).readline) if tok.type == tokenize.COMMENT}
    keys, section = [], ""
    statements = {node.lineno: node for node in ast.parse(block).body}
    for lineno in range(1, len(block.splitlines()) + 1):
        node = statements.get(lineno)
        if node is None:
            section = comments.get(lineno, section)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            keys.append((section, node.targets[0].id, ast.get_source_segment(block, node.value), comments.get(lineno, "")))
    return keys


def write_atomically(path, data):
    """Write bytes (or text, as UTF-8) to path, its directory made if needed, through a temporary
    file renamed into place: an interrupted write leaves no half file where a whole one is expected."""
    if isinstance(data, str):
        data = data.encode()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the name says it is whole (a power cut, not just a kill)
    os.replace(path + ".tmp", path)
