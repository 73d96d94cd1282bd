"""CIFAR datamodules on tiny fixtures in the official layout."""

from __future__ import annotations

import pickle
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datamodules.cifar_files as cifar_files
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from tests.cifar.fixtures import CIFAR10_FOLDER, write_cifar10, write_cifar100

pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning")


def _raw(root, name):
    with (root / CIFAR10_FOLDER / name).open("rb") as handle:
        content = pickle.load(handle)  # our own fixture: trusted
    return content["data"].reshape(-1, 3, 32, 32), np.asarray(content["labels"])


def test_reads_every_training_batch_present(tmp_path):
    write_cifar10(tmp_path, batches=(1, 3), n=40)
    dm = CIFAR10DataModule(tmp_path, batch_size=16)
    dm.prepare_data()
    with pytest.warns(UserWarning, match="2 of the 5 training batches"):
        dm.setup("fit")
    images = np.concatenate([_raw(tmp_path, "data_batch_1")[0], _raw(tmp_path, "data_batch_3")[0]])
    assert len(dm.train_set) == 80 and len(dm.test_set) == 40
    np.testing.assert_array_equal(dm.train_set.images.numpy(), images)


def test_train_batches_selects_files(tmp_path):
    write_cifar10(tmp_path, batches=(1, 2), n=20)
    dm = CIFAR10DataModule(tmp_path, train_batches=[2])
    dm.setup("fit")
    np.testing.assert_array_equal(dm.train_set.labels.numpy(), _raw(tmp_path, "data_batch_2")[1])
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        CIFAR10DataModule(tmp_path, train_batches=[4]).setup("fit")


def test_paper_preprocessing_subtracts_the_training_mean_image(tmp_path):
    write_cifar10(tmp_path, batches=(1,), n=50)
    dm = CIFAR10DataModule(tmp_path, preprocessing="paper")
    dm.setup("fit")
    raw, labels = _raw(tmp_path, "data_batch_1")
    mean = raw.astype(np.float64).mean(axis=0)
    for index in (0, 17, 49):
        image, label = dm.train_set[index]
        assert image.dtype == torch.float32 and int(label) == labels[index]
        np.testing.assert_allclose(image.numpy(), raw[index] - mean, atol=1e-4)
    test_raw, _ = _raw(tmp_path, "test_batch")
    np.testing.assert_allclose(dm.test_set[3][0].numpy(), test_raw[3] - mean, atol=1e-4)
    images, labels_batch = next(iter(dm.train_dataloader()))
    assert images.shape == (50, 3, 32, 32) and labels_batch.dtype == torch.int64


def test_resnet_preprocessing_crops_and_flips_training_images(tmp_path):
    write_cifar10(tmp_path, batches=(1,), n=10)
    dm = CIFAR10DataModule(tmp_path, preprocessing="resnet", seed=3)
    dm.setup("fit")
    raw = dm.train_set.images[4].double() / 255
    np.testing.assert_allclose(dm.test_set[2][0].numpy(), dm.test_set.images[2].numpy() / 255)
    padded = torch.zeros(3, 40, 40, dtype=torch.float64)
    padded[:, 4:36, 4:36] = raw
    candidates = {
        (top, left, flip): (padded[:, top : top + 32, left : left + 32].flip(-1) if flip else
                            padded[:, top : top + 32, left : left + 32])
        for top in range(9) for left in range(9) for flip in (False, True)
    }  # fmt: skip
    seen = set()
    for epoch in range(60):  # the same sample in 60 epochs: (seed, epoch, index) draws
        image = dm.train_set[(epoch, 4)][0].double()
        assert image.shape == (3, 32, 32)
        matches = [key for key, crop in candidates.items() if torch.allclose(image, crop)]
        assert matches, "a training image must be a crop of the padded image, maybe flipped"
        seen.update(matches)
        torch.testing.assert_close(dm.train_set[(epoch, 4)][0], image.float())  # repeatable
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 5
    # a batch drawn at once is the items drawn one by one
    keys = [(7, 4), (7, 1), (8, 4)]
    batch = dm.train_set.__getitems__(keys)
    for key, (image, label) in zip(keys, batch):
        torch.testing.assert_close(image, dm.train_set[key][0])
        assert label == dm.train_set.labels[key[1]]


def test_training_order_is_seeded_and_sharded(tmp_path):
    """The loader's order is ``randperm`` seeded with ``seed + epoch``, every epoch another;
    the ranks of a (simulated) DDP run read disjoint halves that cover the set."""
    write_cifar10(tmp_path, batches=(1,), n=20)
    labels = []
    for rank in (0, 1):
        dm = CIFAR10DataModule(tmp_path, batch_size=5, seed=11)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(2)
        order = torch.randperm(20, generator=torch.Generator().manual_seed(11 + 2))[rank::2]
        got = torch.cat([y for _, y in loader])
        torch.testing.assert_close(got, dm.train_set.labels[order])
        labels.append(order)
    assert sorted(torch.cat(labels).tolist()) == list(range(20))


def test_seeded_validation_split(tmp_path):
    write_cifar10(tmp_path, batches=(1, 2), n=100)

    def split(seed):
        dm = CIFAR10DataModule(tmp_path, val_size=50, split_seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = split(1), split(1), split(2)
    assert len(a.train_set) == 150 and len(a.val_set) == 50
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    everything = torch.cat([a.train_set.images, a.val_set.images]).flatten(1)
    original = torch.from_numpy(
        np.concatenate([_raw(tmp_path, f"data_batch_{i}")[0] for i in (1, 2)])
    ).flatten(1)
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, original.tolist()))
    # the mean image comes from the 150 images trained on, not the held-out 50
    mean = a.train_set.images.double().mean(0).float()
    assert torch.allclose(a.mean_image, mean)
    assert len(a.val_dataloader()) == 1
    assert CIFAR10DataModule(tmp_path).val_dataloader() == []
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(tmp_path, val_size=200).setup("fit")


def test_loader_settings(tmp_path):
    write_cifar10(tmp_path, batches=(1,), n=25)
    dm = CIFAR10DataModule(tmp_path, batch_size=10, drop_last=True)
    dm.setup("fit")
    assert [len(y) for _, y in dm.train_dataloader()] == [10, 10]
    assert [len(y) for _, y in dm.test_dataloader()] == [10, 10, 5]


def test_cifar100_fine_and_coarse_labels(tmp_path):
    write_cifar100(tmp_path, n_train=60, n_test=30)
    fine = CIFAR100DataModule(tmp_path)
    fine.setup("fit")
    coarse = CIFAR100DataModule(tmp_path, label_type="coarse")
    coarse.setup("fit")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert torch.equal(coarse.train_set.labels, fine.train_set.labels // 5)
    assert len(fine.test_set) == 30


def test_missing_files_without_download_say_what_to_put_where(tmp_path):
    dm = CIFAR10DataModule(tmp_path / "nowhere", download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / CIFAR10_FOLDER) in message
    assert "data_batch_1" in message and "test_batch" in message and "download=False" in message


def test_present_files_never_touch_the_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("prepare_data must not download when the files are present")

    monkeypatch.setattr(cifar_files.urllib.request, "urlopen", no_network)
    write_cifar10(tmp_path, batches=(1,), n=5)
    CIFAR10DataModule(tmp_path).prepare_data()
    write_cifar100(tmp_path, n_train=5, n_test=5)
    CIFAR100DataModule(tmp_path).prepare_data()


def test_failed_download_gives_a_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(cifar_files.urllib.request, "urlopen", offline)
    dm = CIFAR100DataModule(tmp_path)
    with pytest.raises(FileNotFoundError, match="no network in this test") as info:
        dm.prepare_data()
    assert "cifar-100-python.tar.gz" in str(info.value) and "train, test" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_size": -5}, "val_size"),
        ({"preprocessing": "zca"}, "preprocessing"),
        ({"train_batches": [6]}, "train_batches"),
        ({"train_batches": []}, "train_batches"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        CIFAR10DataModule(tmp_path, **kwargs)
