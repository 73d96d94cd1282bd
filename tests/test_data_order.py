"""``datamodules.order``: the data order and per-sample randomness as pure functions.

References: torch's own ``DistributedSampler`` for the order, a pure-Python SplitMix64 (on
Python integers, masked to 64 bits) for the hash, and a loader iterated without interruption
for the resumed position.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from datamodules.order import EpochOrder, ResumableLoader, epoch_indices, sample_randint

MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _reference_randint(high: int, seed: int, epoch: int, index: int, stream: int) -> int:
    h = 0
    for key in (seed, epoch, index, stream):
        h = _splitmix64(h ^ (key & MASK))
    return (h >> 11) % high


@pytest.mark.parametrize(
    ("high", "seed", "epoch", "stream"), [(9, 0, 0, 0), (2, 7, 3, 2), (1000, 2**31 + 5, 91, 1)]
)
def test_sample_randint_is_splitmix64_of_the_keys(high, seed, epoch, stream):
    index = torch.cat([torch.arange(0, 50), torch.tensor([12345, 2**40, 49999])])
    got = sample_randint(high, seed, epoch, index, stream)
    expected = [_reference_randint(high, seed, epoch, int(i), stream) for i in index]
    assert got.dtype == torch.int64 and got.tolist() == expected
    small = index[:50].to(torch.int32)
    assert sample_randint(high, seed, epoch, small, stream).tolist() == expected[:50]


def test_sample_randint_is_roughly_uniform_and_streams_differ():
    index = torch.arange(9000)
    counts = torch.bincount(sample_randint(9, 0, 1, index, 0), minlength=9)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 expected, sd ~ 30
    assert not torch.equal(sample_randint(9, 0, 1, index, 0), sample_randint(9, 0, 1, index, 1))
    assert not torch.equal(sample_randint(9, 0, 1, index, 0), sample_randint(9, 0, 2, index, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sample_randint_is_the_same_on_the_gpu():
    index = torch.arange(100000)
    cpu = sample_randint(33, 5, 7, index, 1)
    torch.testing.assert_close(sample_randint(33, 5, 7, index.cuda(), 1).cpu(), cpu)


@pytest.mark.parametrize(("n", "world_size"), [(10, 1), (10, 3), (7, 2), (2, 4)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_indices_are_torchs_distributed_sampler(n, world_size, shuffle):
    shards = []
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=5
        )
        sampler.set_epoch(3)
        got = epoch_indices(n, 5, 3, rank, world_size, shuffle)
        assert got.tolist() == list(sampler)
        shards.append(got)
    assert set(torch.cat(shards).tolist()) == set(range(n))
    if shuffle:
        assert epoch_indices(50, 5, 3).tolist() != epoch_indices(50, 5, 4).tolist()


def test_epoch_order_resumes_at_its_position_and_restarts_at_a_new_epoch():
    order = EpochOrder(10, seed=2, with_epoch=True)
    order.set_epoch(4)
    whole = list(order)
    assert [epoch for epoch, _ in whole] == [4] * 10
    order.advance(3)
    state = order.state_dict()
    again = EpochOrder(10, seed=2, with_epoch=True)
    again.load_state_dict(state)
    again.set_epoch(4)  # what Lightning calls at the resumed epoch: keeps the position
    assert list(again) == whole[3:]
    again.set_epoch(5)
    assert again.position == 0 and len(list(again)) == 10
    again.advance(100)
    assert again.position == len(again) == 10


def test_epoch_order_state_of_another_world_size_warns_and_keeps_the_fraction():
    order = EpochOrder(12, seed=0, rank=0, world_size=1)
    order.advance(6)
    sharded = EpochOrder(12, seed=0, rank=1, world_size=2)
    with pytest.warns(UserWarning, match="world_size 1 -> 2"):
        sharded.load_state_dict(order.state_dict())
    assert sharded.position == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"num_samples": 0}, "num_samples"), ({"num_samples": 4, "seed": -1}, "seed"),
     ({"num_samples": 4, "rank": 2, "world_size": 2}, "rank")],
)  # fmt: skip
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EpochOrder(**kwargs)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_continues_with_the_batches_not_handed_out(workers):
    """The state counts the batches the consumer received, not what workers prefetched."""
    dataset = TensorDataset(torch.arange(23))
    options = {"batch_size": 4, "num_workers": workers, "generator": torch.Generator()}

    def loader() -> ResumableLoader:
        return ResumableLoader(dataset, sampler=EpochOrder(23, seed=9), **options)

    first = loader()
    first.sampler.set_epoch(1)
    expected = [batch[0].tolist() for batch in first]
    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    taken = [next(iterator)[0].tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state["position"] == 8 and state["epoch"] == 1
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert len(resumed) == len(expected) == 6  # the epoch's length, for Lightning's count
    assert taken + [batch[0].tolist() for batch in resumed] == expected


def test_resumable_loader_with_another_sampler_is_a_plain_loader():
    loader = ResumableLoader(TensorDataset(torch.arange(5)), batch_size=2)
    assert loader.state_dict() == {}
    loader.load_state_dict({"epoch": 1, "position": 2})
    assert [b[0].tolist() for b in loader] == [b[0].tolist() for b in DataLoader(loader.dataset, 2)]
