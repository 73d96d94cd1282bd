"""Fixtures of the PTB tests: tiny corpora in the real on-disk format (``ptb.*.txt``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

SPLITS = ("train", "valid", "test")


def write_corpus(folder: Path, lines: dict[str, list[str]]) -> Path:
    """Write ``ptb.<split>.txt`` files, each line framed by spaces like the real files."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_lines in lines.items():
        text = "".join(f" {line} \n" for line in split_lines)
        (folder / f"ptb.{split}.txt").write_text(text)
    return folder


def random_lines(seed: int, count: int, words: list[str], length: tuple[int, int]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(*length))) for _ in range(count)]


@pytest.fixture
def tiny_ptb(tmp_path: Path) -> Path:
    """A small random corpus (40 words with ``<unk>``), large enough for batch 20 x bptt 20."""
    words = [f"w{i}" for i in range(39)] + ["<unk>"]
    lines = {
        "train": random_lines(0, 120, words, (3, 12)),
        "valid": random_lines(1, 60, [*words[:30], "<unk>"], (3, 12)),
        "test": random_lines(2, 60, [*words[:30], "<unk>"], (3, 12)),
    }
    return write_corpus(tmp_path / "ptb", lines)
