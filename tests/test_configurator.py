"""configurator.py: config files and --key=value overrides, checked against known keys and types."""
import os
import subprocess
import sys

import pytest

from configurator import ConfigError, configure, progress_bar, writable_file
from conftest import REPO

DEFAULTS = {"learning_rate": 6e-4, "max_iters": 100, "precision": "bf16", "wandb_log": False, "tweo_lambda": 0.0,
            "n_layer": 12, "n_head": 12, "n_embd": 768, "total_batch_tokens": 1, "micro_batch_size": 1,
            "min_lr": 0.0, "activation_checkpointing": False, "out_dir": "out", "wandb_run_name": "x"}


def test_overrides_take_values_of_the_right_type():
    c = configure(DEFAULTS, ["--learning_rate=3e-4", "--max_iters=7", "--precision=fp8", "--wandb_log=True",
                             "--tweo_lambda=1"])
    assert c["learning_rate"] == 3e-4 and c["max_iters"] == 7 and c["precision"] == "fp8"
    assert c["wandb_log"] is True and c["tweo_lambda"] == 1.0 and isinstance(c["tweo_lambda"], float)
    assert DEFAULTS["max_iters"] == 100  # defaults untouched
    assert configure(DEFAULTS, ["--wandb_log"])["wandb_log"] is True


def test_config_files_then_overrides():
    c = configure(DEFAULTS, [os.path.join(REPO, "configs", "gpt2_xl_fp8_tweo.py"), "--micro_batch_size=2"])
    assert (c["n_layer"], c["n_embd"], c["n_head"]) == (48, 1600, 25)
    assert c["precision"] == "fp8" and c["tweo_lambda"] == 0.01 and c["learning_rate"] == 2e-4
    assert c["total_batch_tokens"] == 1 << 20 and c["micro_batch_size"] == 2
    assert c["out_dir"] == "out/gpt2_xl_fp8_tweo"


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat=1e-3"], "unknown config key 'learning_rat'.*did you mean 'learning_rate'"),
    (["--max_iters=1.5"], "'max_iters' must be int"),
    (["--wandb_log=1"], "'wandb_log' must be bool"),
    (["--max_iters=abc"], "cannot read 'abc' as a int"),
    (["--max_iters"], "written --key=value"),
    (["no_such_file.py"], "config file 'no_such_file.py' not found"),
])
def test_bad_input_names_the_problem(argv, message):
    with pytest.raises(ConfigError, match=message):
        configure(DEFAULTS, argv)


def test_a_typo_in_a_config_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("learning_rate = 1e-3\nmax_iter = 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_iter' in .*did you mean 'max_iters'"):
        configure(DEFAULTS, [str(f)])


def test_train_py_exits_with_one_line_on_a_bad_key(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "configs/tiny.py", "--tweo_lamda=0.1", f"--out_dir={tmp_path}/o"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown config key 'tweo_lamda' in '--tweo_lamda=0.1' (did you mean 'tweo_lambda'?)"]
    assert not os.path.exists(f"{tmp_path}/o")


def test_writable_file_is_a_new_or_existing_file_in_a_folder_that_can_be_made(tmp_path):
    (tmp_path / "afile").write_text("")
    assert writable_file(str(tmp_path / "new.json")) and writable_file(str(tmp_path / "afile"))
    assert writable_file(str(tmp_path / "a" / "b" / "new.json"))  # folders to be created
    assert not writable_file(str(tmp_path))  # a directory
    assert not writable_file(str(tmp_path / "afile" / "x.json"))  # its folder would be a file


class Terminal:
    def isatty(self):
        return True

    def write(self, text):
        self.text = getattr(self, "text", "") + text

    def flush(self):
        pass


def test_a_progress_bar_shows_on_a_terminal_only_and_never_in_ci(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("CI", raising=False)
    assert list(progress_bar(range(3), desc="windows")) == [0, 1, 2] and "windows: 100%" in terminal.text
    monkeypatch.setenv("CI", "true")
    assert progress_bar(range(3)).disable
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    assert progress_bar(range(3)).disable
