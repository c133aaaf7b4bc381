"""bench/tokenizer_throughput.py: 1 and N processes tokenize the same corpus to the same count,
which is tiktoken's own; bad input stops with one line before any work."""
import pytest

from bench.tokenizer_throughput import main as tokenizer_throughput
from conftest import refused
from prepare_openwebtext import demo_documents, gpt2_tokenizer


def test_both_process_counts_tokenize_the_documents_to_tiktokens_count(capsys):
    tokenizer_throughput(["--repeat=1", "--limit=5", "--num_proc=2"])
    rows = {int(line.split()[0]): line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip()[:1].isdigit() and "documents" not in line}
    enc = gpt2_tokenizer()
    expected = sum(len(enc.encode_ordinary(text)) + 1 for text in demo_documents()[:5])  # + the EOT of each
    assert set(rows) == {1, 2} and int(rows[1][1].replace(",", "")) == int(rows[2][1].replace(",", "")) == expected
    assert rows[1][-1] == "1.00x"


@pytest.mark.parametrize("args, message", [(["--num_proc=0"], "--num_proc must be at least 1, not 0"),
                                           (["--repeat=0"], "--repeat must be at least 1, not 0"),
                                           (["--input", "EMPTY"], "no text to tokenize in EMPTY")])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text(" \n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    assert refused(capsys, tokenizer_throughput, *args) == f"error: {message.replace('EMPTY', args[-1])}\n"
