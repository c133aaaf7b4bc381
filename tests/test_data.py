"""data.py: token files and their checks, training and val windows, batches, and the val loss
(padding to equal batches on every rank) on small hand-made token files with known answers."""
import json

import numpy as np
import pytest
import torch

import data as D

CPU = torch.device("cpu")


def token_file(tmp_path, tokens, split="train", meta=None):
    np.asarray(tokens, dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    if meta is not None:
        (tmp_path / "meta.json").write_text(json.dumps(meta))
    return str(tmp_path)


# ---- open_split: a token file, or one readable line saying why not ------------------------

def test_open_split_reads_the_tokens(tmp_path):
    d = token_file(tmp_path, range(100), meta={"train": {"tokens": 100}, "vocab_size": 100})
    data = D.open_split(d, "train", block_size=8, vocab_size=128)
    assert data.dtype == np.uint16 and list(data) == list(range(100))


@pytest.mark.parametrize("case", ["missing", "odd", "meta_count", "meta_json", "short", "unfinished"])
def test_open_split_refuses_what_is_not_a_token_file(tmp_path, case):
    if case == "odd":
        (tmp_path / "train.bin").write_bytes(b"\0" * 41)
    elif case == "meta_count":
        token_file(tmp_path, range(100), meta={"train": {"tokens": 99}})
    elif case == "meta_json":
        token_file(tmp_path, range(100))
        (tmp_path / "meta.json").write_text("{not json")
    elif case == "short":
        token_file(tmp_path, range(9))  # block_size 8: one window of 9 tokens, but the sampler needs 10 (see below)
    elif case == "unfinished":  # prepare_openwebtext.py killed before its last rename: a whole-looking train.bin
        token_file(tmp_path, range(100), meta={"train": {"tokens": 100}})
        (tmp_path / "meta.json").rename(tmp_path / "meta.json.tmp")
    message = {"missing": f"{tmp_path}/train.bin not found: prepare the data first",
               "odd": "has an odd number of bytes (41)",
               "meta_count": "holds 100 tokens but meta.json says 99",
               "meta_json": f"{tmp_path}/meta.json is unreadable",
               "short": "holds 9 tokens, fewer than the 10 that the windows of block_size+1 = 9 need",
               "unfinished": f"{tmp_path} holds an unfinished preparation (meta.json.tmp without meta.json)"}[case]
    with pytest.raises(D.DataError, match=None) as e:
        D.open_split(str(tmp_path), "train", block_size=8)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_open_split_accepts_the_smallest_file_and_its_windows_fit(tmp_path):
    d = token_file(tmp_path, range(10))
    data = D.open_split(d, "train", block_size=8)
    assert sorted(set(D.train_offsets(0, 0, 50, len(data), 8))) == [0]  # one start: offset 0
    x, y = D.get_batch(data, [0], 8, CPU)
    assert x.tolist() == [list(range(8))] and y.tolist() == [list(range(1, 9))]


def test_open_split_checks_the_vocabulary(tmp_path):
    # no meta.json: the largest token decides (260 needs 261 entries)
    d = token_file(tmp_path, [1, 260] * 20)
    D.open_split(d, "train", 8, vocab_size=261)
    with pytest.raises(D.DataError, match=r"needs a vocabulary of 261 but vocab_size is 260"):
        D.open_split(d, "train", 8, vocab_size=260)
    # train with meta.json: meta's vocab_size decides (the file is not scanned) ...
    token_file(tmp_path, [1, 2] * 20, meta={"vocab_size": 300})
    with pytest.raises(D.DataError, match=r"needs a vocabulary of 300 but vocab_size is 299"):
        D.open_split(d, "train", 8, vocab_size=299)
    D.open_split(d, "train", 8, vocab_size=300)
    # ... val is small and scanned too: the larger of the two decides
    token_file(tmp_path, [1, 320] * 20, split="val")
    D.open_split(d, "val", 8, vocab_size=321)
    with pytest.raises(D.DataError, match=r"needs a vocabulary of 321 but vocab_size is 320"):
        D.open_split(d, "val", 8, vocab_size=320)
    token_file(tmp_path, [1, 200] * 20, split="val")
    with pytest.raises(D.DataError, match=r"needs a vocabulary of 300 but vocab_size is 299"):
        D.open_split(d, "val", 8, vocab_size=299)
    D.open_split(d, "val", 8)  # no model vocabulary: nothing to check


# ---- windows ----------------------------------------------------------------------------

def test_train_windows_cover_exactly_the_valid_starts_and_depend_on_seed_and_iteration_only():
    data_len, block = 40, 8
    starts = np.concatenate([D.train_offsets(5, it, 64, data_len, block) for it in range(40)])
    # a window is block+1 tokens: starts 0 .. data_len - block - 2 (the file's last token is never a target)
    assert starts.min() == 0 and starts.max() == data_len - block - 2
    assert set(starts) == set(range(data_len - block - 1))
    a = D.train_offsets(5, 3, 16, data_len, block)
    assert np.array_equal(a, D.train_offsets(5, 3, 16, data_len, block))
    assert not np.array_equal(a, D.train_offsets(5, 4, 16, data_len, block))
    assert not np.array_equal(a, D.train_offsets(6, 3, 16, data_len, block))
    # a larger global batch extends the smaller one: the same windows whatever the GPU count
    assert np.array_equal(D.train_offsets(5, 3, 32, data_len, block)[:16], a)
    # known answer: numpy's generator seeded with [seed, iteration]
    assert np.array_equal(a, np.random.default_rng([5, 3]).integers(0, data_len - block - 1, size=16))


def test_val_windows_are_fixed_and_never_a_training_batch():
    data_len, block = 1000, 16
    val = D.val_offsets(8, data_len, block)
    assert np.array_equal(val, D.val_offsets(8, data_len, block))
    assert np.array_equal(D.val_offsets(16, data_len, block)[:8], val)
    # known answer: the generator seeded with [1337, 0x7E0, 1] whatever the run's seed (the windows of
    # every seed-1337 run before the val set stopped following the seed), starts 0 .. data_len - block - 2
    assert np.array_equal(val, np.random.default_rng([1337, 0x7E0, 1]).integers(0, data_len - block - 1, size=8))
    # no training iteration draws the val windows (iteration 2016 = 0x7E0 once did)
    for it in range(0, 3000):
        assert not np.array_equal(D.train_offsets(1337, it, 8, data_len, block), val), it


def test_rank_slices_split_the_global_batch_in_micro_step_then_rank_order():
    offsets = np.arange(100, 124)  # 24 windows: 3 micro-steps x 2 ranks x 4
    got = {(m, r): D.rank_slice(offsets, m, r, 2, 4).tolist() for m in range(3) for r in range(2)}
    assert got[(0, 0)] == [100, 101, 102, 103] and got[(0, 1)] == [104, 105, 106, 107]
    assert got[(1, 0)] == [108, 109, 110, 111] and got[(2, 1)] == [120, 121, 122, 123]
    assert sorted(sum(got.values(), [])) == offsets.tolist()  # every window once
    # one rank with 6 micro-steps of 4 sees the same windows in the same order
    assert sum((D.rank_slice(offsets, m, 0, 1, 4).tolist() for m in range(6)), []) == offsets.tolist()


def test_get_batch_inputs_and_next_token_targets(tmp_path):
    data = D.open_split(token_file(tmp_path, [7 * i % 251 for i in range(60)]), "train", 5)
    x, y = D.get_batch(data, np.array([0, 54, 13]), 5, CPU)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 5)
    for row, o in enumerate([0, 54, 13]):
        assert x[row].tolist() == [7 * i % 251 for i in range(o, o + 5)]
        assert y[row].tolist() == [7 * i % 251 for i in range(o + 1, o + 6)]


# ---- evaluate: the mean per-window loss, equal on any number of ranks ----------------------

class Bigram(torch.nn.Module):
    """logits[t] = table[x[t]]: a model whose loss on a window is a known sum."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0),
                                                    dtype=torch.float64) * 2)

    def forward(self, x, y):
        return type("Out", (), {"logits": self.table[x]})


def window_loss(table, data, o, block):
    """The window's mean next-token loss, written out in numpy."""
    t = table.detach().numpy()
    nll = [np.log(np.exp(t[data[i]]).sum()) - t[data[i], data[i + 1]] for i in range(o, o + block)]
    return float(np.mean(nll))


@pytest.fixture
def bigram_data(tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 12, 300)
    tokens[:10] = 3  # window 0 (the padding window) has a loss of its own
    return Bigram(12), D.open_split(token_file(tmp_path, tokens, split="val"), "val", 8)


@pytest.mark.parametrize("world_size,micro_batch_size", [(1, 4), (1, 5), (2, 3), (3, 2), (4, 4)])
def test_evaluate_is_the_mean_window_loss_on_any_number_of_ranks(bigram_data, world_size, micro_batch_size):
    model, data = bigram_data
    offsets = np.array([0, 17, 250, 33, 101, 64, 5, 200, 150, 77, 289])  # 11 windows: padding on most layouts
    want = np.mean([window_loss(model.table, data, o, 8) for o in offsets])
    single = D.evaluate(model, data, offsets, 8, 11, CPU, torch.no_grad)  # one rank, one batch, no padding
    assert single == pytest.approx(want, rel=1e-6, abs=0)  # evaluate's cross-entropy runs in fp32
    totals = []
    for rank in range(world_size):
        D.evaluate(model, data, offsets, 8, micro_batch_size, CPU, torch.no_grad, rank=rank, world_size=world_size,
                   all_reduce=totals.append)
    total = sum(totals)  # what the all-reduce (sum) gives every rank
    assert total[1].item() == len(offsets)  # padding windows weigh 0
    assert (total[0] / total[1]).item() == pytest.approx(single, rel=1e-12, abs=0)
    reduced = D.evaluate(model, data, offsets, 8, micro_batch_size, CPU, torch.no_grad, rank=0, world_size=world_size,
                         all_reduce=lambda t: t.copy_(total))
    assert reduced == pytest.approx(single, rel=1e-12, abs=0)


def test_evaluate_with_fewer_windows_than_ranks(bigram_data):
    model, data = bigram_data
    totals = []
    for rank in range(2):
        D.evaluate(model, data, np.array([17]), 8, 2, CPU, torch.no_grad, rank=rank, world_size=2, all_reduce=totals.append)
    total = sum(totals)
    assert totals[1][1].item() == 0 and total[1].item() == 1  # rank 1 runs one all-padding batch
    assert (total[0] / total[1]).item() == pytest.approx(window_loss(model.table, data, 17, 8), rel=1e-6)


def test_evaluate_runs_the_same_number_of_batches_on_every_rank(bigram_data):
    """ZeRO-3 gathers weights in every forward, collectively: a rank with fewer windows must
    still run as many forward passes as the others."""
    model, data = bigram_data
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    offsets = np.arange(0, 70, 7)  # 10 windows on 4 ranks x 2: ranks 0, 1 hold 3, ranks 2, 3 hold 2
    for rank in range(4):
        calls.clear()
        D.evaluate(model, data, offsets, 8, 2, CPU, torch.no_grad, rank=rank, world_size=4)
        assert calls == [2, 2], (rank, calls)
