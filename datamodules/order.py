"""The training data order and per-sample randomness as pure functions, so that any step resumes.

A run killed inside an epoch and resumed must see the rest of that epoch's samples in the same
order, with the same augmentations, as the run that was not killed. Nothing here reads a
global random number stream; everything is a function of integers:

* :func:`epoch_indices` ``(seed, epoch, rank, world_size) -> this rank's sample order`` (the
  recipe of torch's ``DistributedSampler``: ``randperm(N)`` seeded with ``seed + epoch``,
  padded by wrapping to a multiple of ``world_size``, then every ``world_size``-th sample from
  ``rank``), ``(ceil(N / world_size),)`` int64;
* :class:`EpochOrder`, the sampler over it, with the state ``{epoch, position}`` (samples of
  this rank's epoch order already consumed) that a checkpoint stores;
* :class:`ResumableLoader`, a ``DataLoader`` over an ``EpochOrder`` that advances the position
  as it hands batches out and exposes ``state_dict`` / ``load_state_dict``, which Lightning's
  fit loop saves in every checkpoint and restores before the next batch (its support for
  stateful dataloaders); the samples a worker process prefetched but the trainer never
  received are not counted, so ``num_workers > 0`` resumes exactly too;
* :func:`sample_randint` ``(high, seed, epoch, index, stream) -> int in [0, high)``, a
  counter-based hash (SplitMix64 over the keys) for per-sample augmentation, vectorized over
  ``index`` and the same on every device.

Data drawn on an accelerator without a ``DataLoader`` reuses the same functions with its own
``EpochOrder`` (``indices()`` and ``advance``), so it is seeded exactly like the loader path.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

SampleKey = tuple[int, int]  # (epoch, index): what EpochOrder(with_epoch=True) yields
_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """The signed 64-bit integer with the same bits as ``value`` modulo 2**64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def default_seed() -> int:
    """The run's ``seed_everything`` value (Lightning's ``PL_GLOBAL_SEED``), 0 when unset."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def rank_and_world_size(trainer: Any) -> tuple[int, int]:
    """``(global_rank, world_size)`` of a Lightning trainer, ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def epoch_indices(
    num_samples: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> Tensor:
    """This rank's sample indices for ``epoch``: ``(ceil(num_samples / world_size),)`` int64.

    ``order = randperm(num_samples)`` from a generator seeded with ``seed + epoch`` (or
    ``arange`` without ``shuffle``), extended by wrapping around to ``world_size *
    ceil(num_samples / world_size)``, then ``order[rank::world_size]``: the ranks' shards are
    disjoint up to the padding and together cover every sample.
    """
    _check_int("num_samples", num_samples, 1)
    _check_int("world_size", world_size, 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    total = world_size * math.ceil(num_samples / world_size)
    if total > num_samples:
        order = order.repeat(math.ceil(total / num_samples))[:total]
    return order[rank:total:world_size]


class EpochOrder(DistributedSampler):
    """Sampler over :func:`epoch_indices` that can resume inside an epoch.

    State: ``epoch`` (set by Lightning through ``set_epoch`` at every epoch start) and
    ``position``, the samples of this epoch's order already consumed; iterating yields the
    order from ``position`` on. ``set_epoch`` to another epoch starts it at position 0.

    Args:
        num_samples: ``N``, the dataset length.
        seed: seed of the order (``seed + epoch`` seeds each epoch's permutation).
        rank, world_size: this process's shard (the datamodule passes the trainer's); a
            ``DistributedSampler`` subclass, so Lightning does not replace it under DDP.
        shuffle: a new permutation every epoch (``False``: ``0 .. N-1`` in order).
        with_epoch: yield ``(epoch, index)`` keys instead of indices, for datasets whose
            items depend on the epoch (per-sample augmentation, see :func:`sample_randint`).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        with_epoch: bool = False,
    ) -> None:
        _check_int("num_samples", num_samples, 1)
        _check_int("seed", seed, 0)
        epoch_indices(1, seed, 0, rank, world_size)  # validates rank and world_size
        super().__init__(range(num_samples), num_replicas=world_size, rank=rank, shuffle=shuffle)
        self.seed = seed
        self.with_epoch = bool(with_epoch)
        self.dataset_size = num_samples
        self.position = 0

    def indices(self) -> Tensor:
        """This rank's whole order for the current epoch, ``(len(self),)``."""
        return epoch_indices(
            self.dataset_size, self.seed, self.epoch, self.rank, self.num_replicas, self.shuffle
        )

    def __iter__(self) -> Iterator[int | SampleKey]:
        epoch = self.epoch
        remaining = self.indices()[self.position :].tolist()
        if self.with_epoch:
            return iter([(epoch, index) for index in remaining])
        return iter(remaining)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def advance(self, count: int) -> None:
        """Count ``count`` more samples of this epoch as consumed (at most to its end)."""
        self.position = min(self.position + count, len(self))

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.dataset_size,
            "world_size": self.num_replicas,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state``'s epoch and position.

        A state saved with another dataset length, world size, seed or shuffle cannot be
        replayed exactly: a warning says so and the epoch continues from the same fraction.
        """
        epoch, position = int(state["epoch"]), int(state["position"])
        saved = {key: state.get(key) for key in ("num_samples", "world_size", "seed", "shuffle")}
        here = {
            "num_samples": self.dataset_size,
            "world_size": self.num_replicas,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }
        differing = {k: (v, here[k]) for k, v in saved.items() if v is not None and v != here[k]}
        if differing:
            saved_length = math.ceil(saved["num_samples"] / saved["world_size"])
            position = round(position * len(self) / max(saved_length, 1))
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in differing.items())
            warnings.warn(
                f"the data order saved in the checkpoint cannot be replayed exactly ({what}); "
                f"epoch {epoch} continues at sample {position} of {len(self)}",
                stacklevel=2,
            )
        self.epoch = epoch
        self.position = min(max(position, 0), len(self))


class ResumableLoader(DataLoader):
    """``DataLoader`` over an :class:`EpochOrder` whose state travels in checkpoints.

    Built like any ``DataLoader`` with ``sampler=EpochOrder(...)``. Each batch handed out
    advances the order by ``batch_size`` samples (1 with ``batch_size=None``), counted here in
    the main process, after any worker prefetching; ``state_dict()`` is the order's state.
    The underlying iterator (and its workers' index prefetching) starts at the first
    ``next()``, after Lightning's ``set_epoch``. With another sampler (Lightning swaps one
    in for ``overfit_batches``) it is a plain ``DataLoader`` with an empty state.
    """

    @property
    def order(self) -> EpochOrder | None:
        return self.sampler if isinstance(self.sampler, EpochOrder) else None

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict() if self.order is not None else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.order is not None and state:
            self.order.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        order, step = self.order, self.batch_size or 1
        for batch in super().__iter__():
            if order is not None:
                order.advance(step)
            yield batch


def _splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's output function on int64 tensors (wrapping arithmetic, logical shifts)."""

    def shift_right(z: Tensor, bits: int) -> Tensor:
        return (z >> bits) & ((1 << (64 - bits)) - 1)

    z = x + _GOLDEN
    z = (z ^ shift_right(z, 30)) * _MIX1
    z = (z ^ shift_right(z, 27)) * _MIX2
    return z ^ shift_right(z, 31)


def sample_randint(high: int, seed: int, epoch: int, index: Tensor, stream: int = 0) -> Tensor:
    """Uniform integers in ``[0, high)``, one per entry of ``index``, from the keys alone.

    ``h = mix(mix(mix(mix(0 ^ seed) ^ epoch) ^ index) ^ stream)`` with ``mix`` SplitMix64's
    output function on 64-bit words; the result is ``(h >> 11) mod high`` (the top 53 bits;
    the bias of the modulo is below ``high / 2**53``). ``stream`` tells apart independent
    draws of the same sample (e.g. 0: crop row, 1: crop column, 2: flip). ``index`` is any
    integer tensor (on any device); the result is int64 of its shape on its device.
    """
    _check_int("high", high, 1)
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
    h = _splitmix64(torch.full_like(index, _int64(seed), dtype=torch.int64))
    h = _splitmix64(h ^ _int64(epoch))
    h = _splitmix64(h ^ index.to(torch.int64))
    h = _splitmix64(h ^ _int64(stream))
    return ((h >> 11) & ((1 << 53) - 1)) % high
