"""SR patches and evaluation images under DDP, with simulated ranks.

Each rank builds its own datamodule (as every DDP process does). The training loader shards
itself by the trainer's rank (its ``EpochOrder`` is a ``DistributedSampler``, which Lightning
keeps); for the validation loader Lightning puts in a ``DistributedSampler``
(``_get_distributed_sampler``, the function the trainer uses). The patch set is drawn from
``seed`` once, so every rank holds the same patches and the shards are disjoint shards of it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from datamodules.super_resolution import SuperResolutionDataModule
from tests.sr.conftest import write_rgb

WORLD = 2


def _shard_keys(loader: DataLoader, rank: int, shuffle: bool, mode: RunningStage) -> list[bytes]:
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler):  # what the trainer does under DDP
        sampler = _get_distributed_sampler(
            loader, shuffle=shuffle, overfit_batches=0, mode=mode, num_replicas=WORLD, rank=rank
        )
    sampler.set_epoch(1)
    dataset = loader.dataset
    return [torch.cat([t.flatten() for t in dataset[i]]).numpy().tobytes() for i in sampler]


@pytest.fixture
def folders(tmp_path):
    for name, seed in (("a.png", 0), ("b.png", 1), ("c.png", 2)):
        (tmp_path / "train").mkdir(exist_ok=True)
        write_rgb(tmp_path / "train" / name, 30, 34, seed)
    (tmp_path / "eval").mkdir()
    for name, seed in (("x.png", 3), ("y.png", 4)):
        write_rgb(tmp_path / "eval" / name, 24, 27, seed)
    return tmp_path


def _datamodule(root, rank: int) -> SuperResolutionDataModule:
    datamodule = SuperResolutionDataModule(
        data_dir=str(root), train_dir="train", val_dir="eval", test_dir="train", scale=3,
        patch_size=9, patches_per_image=6, batch_size=4, seed=5,
    )  # fmt: skip
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=WORLD)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize(
    ("loader_name", "shuffle", "mode"),
    [
        ("train_dataloader", True, RunningStage.TRAINING),
        ("val_dataloader", False, RunningStage.VALIDATING),
    ],
)
def test_sr_ranks_see_disjoint_samples_covering_the_set(folders, loader_name, shuffle, mode):
    ranks = [_datamodule(folders, rank) for rank in range(WORLD)]  # one per process
    torch.testing.assert_close(ranks[0].train_set.positions, ranks[1].train_set.positions)
    loaders = [getattr(dm, loader_name)() for dm in ranks]
    shards = [_shard_keys(loader, rank, shuffle, mode) for rank, loader in enumerate(loaders)]
    dataset = loaders[0].dataset
    everything = {
        torch.cat([t.flatten() for t in dataset[i]]).numpy().tobytes() for i in range(len(dataset))
    }
    assert len(everything) == len(dataset)  # every patch / image is distinct
    assert all(len(shard) == len(dataset) // WORLD for shard in shards)
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == everything
