"""The reader and datamodule on the real CIFAR-10 files of the shared data folder."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.cifar import CIFAR10DataModule
from datamodules.cifar_files import load_pickle, read_batch

pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning")


def test_real_cifar10_batches(shared_data):
    folder = shared_data / "cifar10" / "cifar-10-batches-py"
    for name in ("data_batch_1", "test_batch"):
        batch = read_batch(folder / name, "labels", 10)
        assert batch.images.shape == (10000, 3, 32, 32) and batch.images.dtype == np.uint8
        counts = np.bincount(batch.labels, minlength=10)
        assert counts.sum() == 10000 and counts.min() > 800
        if name == "test_batch":
            assert counts.tolist() == [1000] * 10  # the official test set is balanced
        # real photographs: every channel spans (nearly) the full 0-255 range
        assert batch.images.min() == 0 and batch.images.max() == 255
        assert 100 < batch.images.mean() < 140
    meta = load_pickle(folder / "batches.meta")
    assert meta["label_names"][:3] == ["airplane", "automobile", "bird"]


def test_real_cifar10_datamodule(shared_data):
    dm = CIFAR10DataModule(shared_data / "cifar10", val_size=1000, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9000, 1000, 10000)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (100, 3, 32, 32) and labels.shape == (100,)
    # mean-image subtraction: the training set now averages to zero at every pixel
    assert abs(float(dm.train_set.images.float().mean() - dm.mean_image.mean())) < 1e-3
    assert abs(float(images.mean())) < 10
