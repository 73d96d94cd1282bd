"""Batches drawn where the data live (the training GPU), without a ``DataLoader`` or workers.

On a GPU the paper's small models are launch-bound: a ``DataLoader`` that gathers a batch
sample by sample in Python and copies it to the device costs more than the step. With
``device_resident`` a datamodule keeps each split on the training device as one tensor and
:class:`DeviceBatches` draws every batch there with a few tensor operations, in exactly the
order of the ``DataLoader`` path (the same :class:`~datamodules.order.EpochOrder`, seeded and
sharded over the DDP ranks the same way) and with the same per-sample randomness, so both
paths give the same batches and checkpoints of one resume in the other.

:class:`DeviceBatches` is what ``train_dataloader`` returns then: an iterable with ``len``,
a ``sampler`` (the ``EpochOrder``, on which Lightning calls ``set_epoch``) and
``state_dict`` / ``load_state_dict`` (the order's state, which Lightning's fit loop saves in
every checkpoint and restores before the next batch), so Lightning's loops, progress
tracking and mid-epoch resumption work as with :class:`~datamodules.order.ResumableLoader`.
Lightning adds no sampler to it (it is not a ``DataLoader``), and its batch transfer is a
no-op for tensors already on the module's device (``Tensor.to`` returns the tensor itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from datamodules.order import EpochOrder

DrawBatch = Callable[[int, Tensor], Any]
DrawItem = Callable[[int, int], Any]


def training_device(trainer: Any) -> torch.device:
    """The device the trainer's module trains on (its strategy's ``root_device``); the CPU
    without a trainer or strategy."""
    strategy = getattr(trainer, "strategy", None)
    device = getattr(strategy, "root_device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def resident_device(device_resident: bool | None, trainer: Any) -> torch.device | None:
    """Where the data should live: the training device when ``device_resident`` is true, or
    when it is ``None`` and that device is not the CPU (a GPU); ``None`` for the
    ``DataLoader`` path."""
    if device_resident is not None and not isinstance(device_resident, bool):
        raise TypeError(
            f"device_resident must be True, False or None, got {device_resident!r} "
            f"({type(device_resident).__name__})"
        )
    device = training_device(trainer)
    if device_resident is None:
        device_resident = device.type != "cpu"
    return device if device_resident else None


def check_device_resident(device_resident: Any) -> bool | None:
    """``device_resident`` itself when it is ``True``, ``False`` or ``None``; else ``TypeError``."""
    resident_device(device_resident, None)
    return device_resident


class DeviceBatches:
    """The batches of one split, drawn on the device in the order of an :class:`EpochOrder`.

    Iterating reads the order of the current epoch from its ``position`` on, cuts it into
    batches of ``batch_size`` samples (the last one shorter, or dropped with ``drop_last``;
    ``len`` counts the whole epoch, as a ``DataLoader``'s does) and yields ``draw(epoch,
    indices)`` for each, ``indices`` ``(B,)`` int64 on ``device`` (the epoch's order is moved
    there once per epoch). With ``batch_size=None`` every index is a batch of its own and
    ``draw(epoch, index)`` gets a Python int (a PTB window, a whole SR image). Every batch
    handed out advances the order by ``batch_size`` (1 with ``None``) before it is yielded,
    so ``state_dict()`` is the position of the next batch. An evaluation split
    (``resumable=False``) is read whole at every pass and leaves the position alone: a
    sanity check or an earlier validation in the same epoch does not shorten the next one.

    Args:
        draw: ``(epoch, indices) -> batch``, the batch of those samples (on ``device``).
        order: the samples' order (this rank's shard; its state travels in checkpoints).
        batch_size: samples per batch, or ``None`` (each index is a batch).
        drop_last: drop the last incomplete batch of an epoch.
        device: where ``indices`` are put before ``draw`` sees them.
        resumable: continue from the order's position and advance it (training); ``False``
            reads every pass from the epoch's start (evaluation).
    """

    def __init__(
        self,
        draw: DrawBatch | DrawItem,
        order: EpochOrder,
        batch_size: int | None,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        resumable: bool = True,
    ) -> None:
        if not callable(draw):
            raise TypeError(f"draw must be callable, got {type(draw).__name__}")
        if not isinstance(order, EpochOrder):
            raise TypeError(f"order must be an EpochOrder, got {type(order).__name__}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        self.draw = draw
        self.order = order
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.device = torch.device(device)
        self.resumable = bool(resumable)

    batch_sampler = None  # none: Lightning's checks of a loader's sampler read this name too

    @property
    def sampler(self) -> EpochOrder:
        """The order, under the name Lightning looks for to call ``set_epoch`` each epoch."""
        return self.order

    def __len__(self) -> int:
        samples = len(self.order)
        if self.batch_size is None:
            return samples
        if self.drop_last:
            return samples // self.batch_size
        return math.ceil(samples / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        order, epoch = self.order, self.order.epoch
        remaining = order.indices()[order.position if self.resumable else 0 :]
        advance = order.advance if self.resumable else lambda count: None
        if self.batch_size is None:
            for index in remaining.tolist():
                advance(1)
                yield self.draw(epoch, index)
            return
        size = self.batch_size
        count = len(remaining) // size if self.drop_last else math.ceil(len(remaining) / size)
        remaining = remaining.to(self.device, non_blocking=True)
        for start in range(0, count * size, size):
            advance(size)
            yield self.draw(epoch, remaining[start : start + size])

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self.order.load_state_dict(state)
