"""PennTreebankDataModule: reading, vocabulary, contiguous batching, DDP shards, real counts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.ptb import BpttWindows, PennTreebankDataModule, batchify
from tests.ptb.conftest import write_corpus


def _words_of(path: Path) -> list[str]:
    """Independent reference: split every line by hand, ``<eos>`` at each line end."""
    words = []
    with open(path) as handle:
        for line in handle:
            words += [*line.split(), "<eos>"]
    return words


def test_words_vocabulary_and_encoding(tmp_path: Path) -> None:
    folder = write_corpus(
        tmp_path,
        {"train": ["b a b", "c <unk> b"], "valid": ["a zzz"], "test": ["c c"]},
    )
    dm = PennTreebankDataModule(data_dir=str(folder), batch_size=1, bptt=2)
    dm.setup("fit")
    assert dm.words("train") == ["b", "a", "b", "<eos>", "c", "<unk>", "b", "<eos>"]
    # most frequent first (b: 3, <eos>: 2), ties alphabetical
    assert dm.get_vocabulary() == ["b", "<eos>", "<unk>", "a", "c"]
    assert dm.vocab_size == 5
    # a word unseen in training becomes <unk>
    assert dm.tokens("valid").tolist() == [3, 2, 1]


def test_batchify_streams_are_contiguous_and_in_order() -> None:
    tokens = torch.arange(23)
    streams = batchify(tokens, batch_size=4)
    assert streams.tolist() == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [10, 11, 12, 13, 14],
        [15, 16, 17, 18, 19],
    ]
    windows = list(BpttWindows(streams, bptt=3))
    assert len(windows) == len(BpttWindows(streams, bptt=3)) == 2
    (x0, y0), (x1, y1) = windows
    assert x0.tolist()[0] == [0, 1, 2] and y0.tolist()[0] == [1, 2, 3]
    assert x1.tolist()[0] == [3] and y1.tolist()[0] == [4]  # last window shorter
    # every (input, target) pair of the streams appears once, in order
    pairs = [(int(a), int(b)) for x, y in windows for a, b in zip(x[1], y[1], strict=True)]
    assert pairs == [(5, 6), (6, 7), (7, 8), (8, 9)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_contiguous_streams(tiny_ptb: Path, world_size: int) -> None:
    seen = []
    lengths = set()
    for rank in range(world_size):
        dm = PennTreebankDataModule(data_dir=str(tiny_ptb), batch_size=3, bptt=5)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        lengths.add(len(batches))
        inputs = torch.cat([x for x, _ in batches], dim=1)  # (3, L - 1) of this rank
        targets = torch.cat([y for _, y in batches], dim=1)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # windows follow each other
        seen.append(torch.cat([inputs, targets[:, -1:]], dim=1))
    assert len(lengths) == 1  # every rank runs the same number of steps (no DDP hang)
    # the ranks' streams, stacked in rank order, are the token stream cut in order
    full = dm.tokens("train")
    streams = torch.cat(seen)
    length = streams.shape[1]
    assert torch.equal(streams.reshape(-1), full[: streams.numel()])
    assert streams.shape[0] == 3 * world_size and length == full.numel() // (3 * world_size)


def test_loaders_use_their_batch_sizes(tiny_ptb: Path) -> None:
    dm = PennTreebankDataModule(data_dir=str(tiny_ptb), batch_size=4, bptt=6, val_batch_size=2)
    dm.setup("fit")
    dm.setup("test")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 6) and x.dtype == torch.long
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 6)
    test_batches = list(dm.test_dataloader())
    assert test_batches[0][0].shape == (1, 6)
    # batch 1: the whole test split (but its final token) is read as inputs, in order
    test_tokens = dm.tokens("test")
    assert torch.equal(torch.cat([x[0] for x, _ in test_batches]), test_tokens[:-1])


def test_vocabulary_travels_in_state_dict(tiny_ptb: Path, tmp_path: Path) -> None:
    dm = PennTreebankDataModule(data_dir=str(tiny_ptb))
    dm.setup("fit")
    state = dm.state_dict()
    # a folder without the training file: evaluation needs the restored vocabulary
    folder = write_corpus(
        tmp_path / "eval", {"test": (tiny_ptb / "ptb.test.txt").read_text().splitlines()}
    )
    fresh = PennTreebankDataModule(data_dir=str(folder))
    fresh.setup("test")
    with pytest.raises(FileNotFoundError, match=r"ptb\.train\.txt"):
        fresh.tokens("test")
    fresh.load_state_dict(state)
    assert fresh.get_vocabulary() == dm.get_vocabulary()
    assert torch.equal(fresh.tokens("test"), dm.tokens("test"))


def test_missing_files_fail_fast_with_the_expected_names(tmp_path: Path) -> None:
    folder = tmp_path / "nowhere"
    dm = PennTreebankDataModule(data_dir=str(folder), download=True)
    dm.prepare_data()  # offline here: the download fails quietly, setup says what is missing
    if dm.path("train").is_file():
        pytest.skip("the network is available: the files were downloaded")
    with pytest.raises(
        FileNotFoundError, match=r"ptb\.train\.txt.*ptb\.valid\.txt.*ptb\.test\.txt"
    ):
        dm.setup("fit")
    dm = PennTreebankDataModule(data_dir=str(folder), download=False)
    dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"ptb\.valid\.txt.*download=False"):
        dm.setup("validate")


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [("batch_size", 0, ValueError), ("bptt", 2.5, TypeError), ("test_batch_size", -1, ValueError)],
)
def test_bad_arguments_are_named(name: str, value: object, error: type) -> None:
    with pytest.raises(error, match=name):
        PennTreebankDataModule(**{name: value})


def test_real_ptb_counts(shared_data: Path) -> None:
    folder = shared_data / "ptb"
    dm = PennTreebankDataModule(data_dir=str(folder), download=False)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    counts = {split: len(dm.words(split)) for split in ("train", "valid", "test")}
    assert counts == {"train": 929_589, "valid": 73_760, "test": 82_430}
    assert dm.vocab_size == 10_000
    assert dm.words("valid") == _words_of(folder / "ptb.valid.txt")
    vocabulary = set(dm.get_vocabulary())
    assert {"<eos>", "<unk>", "N"} <= vocabulary
    # valid and test hold no word outside the training vocabulary
    assert set(dm.words("valid")) <= vocabulary and set(dm.words("test")) <= vocabulary
