"""Training throughput of the CIFAR small CNN through Lightning and through a bare PyTorch loop.

    python benchmarks/train.py [--repeats 30] [--norms none dn*] [--batch-size 100]
                               [--device cpu|cuda] [--precision 32-true|bf16-mixed]

The model is :class:`ClassificationTask`'s ``small_cnn`` (the paper's CIFAR-10 network) with
its default optimizer (SGD, momentum 0.9); the data are random tensors of CIFAR's shape served
by ``DataLoader`` s (batch 100). Three loops train three copies of the same network:

* ``lightning``: ``Trainer.fit`` for a fixed number of steps (no logger, checkpoint, progress
  bar, model summary or validation): the task's ``training_step`` with its loss, accuracy
  metric, logging and sparsity penalty, Lightning's hooks and optimizer closure;
* ``bare loop``: next batch, ``model(x)``, cross-entropy plus ``sparsity_penalty``,
  ``zero_grad``, ``backward``, ``step``;
* ``bare + metric``: the bare loop plus the batch accuracy the task computes, to tell the
  task's own work from the framework's.

This machine's speed drifts by tens of percent within seconds, so the loops run in lock-step:
after every Lightning step a callback runs one step of each bare loop and times it; a
Lightning step is the time from the start of one batch to the start of the next, less the
bare steps run in between. The overhead is the median over steps of the ratio of the
Lightning step to the bare step run right after it, minus one. After 3 warm-up steps it
prints the median step times, images per second and that overhead, and each norm's bare step
against the unnormalized one's (``x none``). On a GPU every step ends with a synchronize, the
batches are moved to the device as a DataLoader's would be, and ``--precision bf16-mixed``
runs the bare loops under bfloat16 autocast as Lightning's plugin does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import warnings
from collections.abc import Iterator

import allocator
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_accuracy

from lit_divnorm.norm.sparsity import sparsity_penalty
from lit_divnorm.tasks.classification import ClassificationTask

WARMUP = 3
BARE = ("bare loop", "bare + metric")


def make_loader(batch_size: int, batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size * batches, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch_size * batches,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def make_task(norm: str) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask("small_cnn", num_classes=10, norm=norm)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """A plain PyTorch training loop over its own copy of the network, one step per call."""

    def __init__(
        self, norm: str, loader: DataLoader, with_metric: bool, device: torch.device, precision: str
    ) -> None:
        task = make_task(norm)
        self.model = task.model.to(device).train()
        self.optimizer = task.configure_optimizers()
        self.with_metric = with_metric
        self.device = device
        self.autocast = precision == "bf16-mixed"
        self.batches: Iterator[tuple[Tensor, Tensor]] = iter(loader)

    def step(self) -> float:
        """One training step; returns its time in ms."""
        start = time.perf_counter()
        images, labels = (t.to(self.device, non_blocking=True) for t in next(self.batches))
        context = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with context:
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels) + sparsity_penalty(self.model)
        if self.with_metric:  # the task's training accuracy
            multiclass_accuracy(logits.detach(), labels, 10, average="micro")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        synchronize(self.device)
        return (time.perf_counter() - start) * 1e3


class LockStep(pl.Callback):
    """Times Lightning's steps and runs one step of every bare loop after each of them."""

    def __init__(self, loops: dict[str, BareLoop], device: torch.device) -> None:
        self.loops = loops
        self.device = device
        self.times: dict[str, list[float]] = {"lightning": [], **{name: [] for name in loops}}
        self.start: float | None = None
        self.bare_ms = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        synchronize(self.device)  # the previous Lightning step has finished on the device
        now = time.perf_counter()
        if self.start is not None:
            self.times["lightning"].append((now - self.start) * 1e3 - self.bare_ms)
        self.start = now

    def on_train_batch_end(self, *args: object) -> None:
        synchronize(self.device)
        self.bare_ms = 0.0
        for name, loop in self.loops.items():
            ms = loop.step()
            self.times[name].append(ms)
            self.bare_ms += ms


def measure(
    norm: str, batch_size: int, repeats: int, device: torch.device, precision: str
) -> dict[str, list[float]]:
    steps = WARMUP + repeats + 1
    loader = make_loader(batch_size, steps + 1)
    loops = {name: BareLoop(norm, loader, name != "bare loop", device, precision) for name in BARE}
    timer = LockStep(loops, device)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(make_task(norm), train_dataloaders=loader)
    count = len(timer.times["lightning"])  # the last step has no next start
    return {name: values[WARMUP:count] for name, values in timer.times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed steps")
    parser.add_argument("--norms", nargs="*", default=["none", "dn*"])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    allocator.add_flag(parser)
    args = parser.parse_args()
    allocator.apply_flag(args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {where}, ", end="")
    print(f"threads {torch.get_num_threads()}, precision {args.precision}")
    print(
        f"small CNN, batch {args.batch_size} of 3x32x32, median of {args.repeats} steps, "
        "the three loops in lock-step"
    )
    header = f"{'norm':<8}{'loop':<16}{'ms/step':>9}{'images/s':>10}{'lightning overhead':>20}"
    print(header + f"{'x none':>8}")
    medians: dict[tuple[str, str], float] = {}
    for norm in args.norms:
        times = measure(norm, args.batch_size, args.repeats, device, args.precision)
        light = times["lightning"]
        for name, values in times.items():
            ms = medians[norm, name] = statistics.median(values)
            overhead = ""
            if name != "lightning":
                ratios = [a / b for a, b in zip(light, values, strict=True)]
                overhead = f"{statistics.median(ratios) - 1:+.1%}"
            against = medians.get(("none", name))
            versus = f"{ms / against:8.2f}" if against else f"{'-':>8}"
            line = f"{norm:<8}{name:<16}{ms:9.1f}{args.batch_size / ms * 1e3:10.0f}{overhead:>20}"
            print(line + versus)


if __name__ == "__main__":
    main()
