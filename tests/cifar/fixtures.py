"""Tiny CIFAR folders in the official on-disk format (Python pickles of dicts)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"


def make_images(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """uint8 rows (N, 3072): a class-dependent colour plus noise, so a model can learn them."""
    rng = np.random.default_rng(seed)
    colours = np.linspace(20, 235, num_classes)
    base = np.stack([colours[labels], colours[::-1][labels], colours[(labels * 3) % num_classes]])
    images = base.T[:, :, None] + rng.normal(0, 20, size=(len(labels), 3, 1024))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_pickle(path: Path, content: dict, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=protocol)


def cifar10_batch(n: int, seed: int, bytes_keys: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    content = {
        "batch_label": f"fixture batch {seed}",
        "labels": [int(v) for v in labels],
        "data": make_images(labels, 10, seed),
        "filenames": [f"img_{seed}_{i}.png" for i in range(n)],
    }
    if bytes_keys:  # what a Python 2 pickle of the official files decodes to with bytes keys
        content = {k.encode(): v for k, v in content.items()}
    return content


def write_cifar10(root: Path, batches: tuple[int, ...] = (1, 2), n: int = 100) -> Path:
    """``root/cifar-10-batches-py/data_batch_<b>`` for ``b`` in ``batches`` and ``test_batch``."""
    folder = root / CIFAR10_FOLDER
    for b in batches:
        write_pickle(folder / f"data_batch_{b}", cifar10_batch(n, seed=b))
    write_pickle(folder / "test_batch", cifar10_batch(n, seed=99))
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return root


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """``root/cifar-100-python/{train,test}`` with fine (100) and coarse (20) labels."""
    folder = root / CIFAR100_FOLDER
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = np.random.default_rng(seed).integers(0, 100, size=n)
        write_pickle(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(n)],
                "batch_label": name,
                "fine_labels": [int(v) for v in fine],
                "coarse_labels": [int(v) // 5 for v in fine],
                "data": make_images(fine, 100, seed),
            },
        )
    return root
