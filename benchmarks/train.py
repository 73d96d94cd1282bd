"""Training throughput of the CIFAR small CNN through Lightning and through a bare PyTorch loop,
on today's DataLoader path and on the fast path (device-resident data and a compiled step).

    python benchmarks/train.py [--repeats 30] [--norms none dn*] [--batch-size 100]
                               [--paths loader fast] [--compile-backend inductor]
                               [--device cpu|cuda] [--precision 32-true|bf16-mixed]

The model is :class:`ClassificationTask`'s ``small_cnn`` (the paper's CIFAR-10 network) with
its default optimizer (SGD, momentum 0.9); the data are random uint8 images of CIFAR's shape
in a ``CIFAR10DataModule`` with the paper's preprocessing (the mean image subtracted), batch
100, read two ways:

* ``loader`` (today's path): the datamodule's ``DataLoader`` (in the main process; the eager
  model), each batch copied to the device as Lightning does;
* ``fast``: the same datamodule with ``device_resident=True`` (the split on the device, every
  batch drawn there by ``DeviceBatches``) and the task with ``compile=True`` (inductor, with
  CUDA graphs on a GPU; ``--compile-backend aot_eager`` for a quick check without inductor).

For each path three loops train three copies of the same network:

* ``lightning``: ``Trainer.fit`` for a fixed number of steps (no logger, checkpoint, progress
  bar, model summary or validation): the task's ``training_step`` with its loss, accuracy
  metric, logging and sparsity penalty, Lightning's hooks and optimizer closure;
* ``bare loop``: next batch (from the same kind of loader, compiled model on the fast path),
  ``model(x)``, cross-entropy plus ``sparsity_penalty``, ``zero_grad``, ``backward``, ``step``;
* ``bare + metric``: the bare loop plus the batch accuracy the task computes, to tell the
  task's own work from the framework's.

This machine's speed drifts by tens of percent within seconds, so the loops of a path run in
lock-step: after every Lightning step a callback runs one step of each bare loop and times
it; a Lightning step is the time from the start of one batch to the start of the next, less
the bare steps run in between. The overhead is the median over steps of the ratio of the
Lightning step to the bare step run right after it, minus one. After 3 warm-up steps (the
compilation happens in them) it prints the median step times, images per second and that
overhead, each norm's step against the unnormalized one's (``x none``) and the fast path's
against the DataLoader path's (``x loader``, from two runs one after the other: the targets
are at most 0.8 for the Lightning step and at most 5% Lightning overhead on the fast path).
On a GPU every step ends with a synchronize, and ``--precision bf16-mixed`` runs the bare
loops under bfloat16 autocast as Lightning's plugin does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator

import allocator
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from datamodules.cifar import CIFAR10DataModule, CifarDataset, SubtractMeanImage
from datamodules.device_batches import DeviceBatches
from datamodules.order import EpochOrder, ResumableLoader
from lit_divnorm.norm.sparsity import sparsity_penalty
from lit_divnorm.tasks.base import compile_options
from lit_divnorm.tasks.classification import ClassificationTask

WARMUP = 3
BARE = ("bare loop", "bare + metric")


PATHS = ("loader", "fast")


def make_dataset(batch_size: int, batches: int) -> CifarDataset:
    """Random uint8 CIFAR-shaped images and labels, with the paper's mean-image transform."""
    generator = torch.Generator().manual_seed(0)
    count = batch_size * batches
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return CifarDataset(images, labels, SubtractMeanImage(images.double().mean(0).float()))


class InMemoryCIFAR10(CIFAR10DataModule):
    """The CIFAR-10 datamodule over a training split already in memory (no files to read)."""

    def __init__(self, dataset: CifarDataset, batch_size: int, fast: bool) -> None:
        super().__init__(batch_size=batch_size, device_resident=fast, seed=0)
        self.train_set = dataset

    def prepare_data(self) -> None:
        """Nothing to download or check: the split is in memory."""


def bare_batches(dataset: CifarDataset, batch_size: int, fast: bool, device) -> Iterable:
    """What the datamodule's ``train_dataloader`` gives a trainer on ``device``."""
    order = EpochOrder(len(dataset), seed=0)
    if fast:
        return DeviceBatches(dataset.to(device).batch, order, batch_size, device=device)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=order)


def compile_spec(fast: bool, backend: str) -> bool | dict:
    """The task's ``compile`` argument of a path: ``True`` (inductor, CUDA graphs on a GPU)
    or another backend by name; the DataLoader path is eager."""
    if not fast:
        return False
    return True if backend == "inductor" else {"backend": backend}


def make_task(norm: str, compile: bool | dict = False) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask("small_cnn", num_classes=10, norm=norm, compile=compile)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """A plain PyTorch training loop over its own copy of the network, one step per call."""

    def __init__(
        self,
        norm: str,
        batches: Iterable,
        with_metric: bool,
        device: torch.device,
        precision: str,
        compile: bool | dict,
    ) -> None:
        task = make_task(norm)
        self.model = task.model.to(device).train()
        options = compile_options(compile, device)
        if options is not None:
            self.model.compile(**options)
        self.cuda_graphs = options is not None and options.get("mode") == "reduce-overhead"
        self.optimizer = task.configure_optimizers()
        self.with_metric = with_metric
        self.device = device
        self.autocast = precision == "bf16-mixed"
        self.batches: Iterator[tuple[Tensor, Tensor]] = iter(batches)

    def step(self) -> float:
        """One training step; returns its time in ms."""
        start = time.perf_counter()
        images, labels = (t.to(self.device, non_blocking=True) for t in next(self.batches))
        if self.cuda_graphs and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
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
    norm: str,
    path: str,
    batch_size: int,
    repeats: int,
    device: torch.device,
    precision: str,
    backend: str,
) -> dict[str, list[float]]:
    steps = WARMUP + repeats + 1
    fast = path == "fast"
    dataset = make_dataset(batch_size, steps + 1)
    compile = compile_spec(fast, backend)
    loops = {
        name: BareLoop(
            norm,
            bare_batches(dataset, batch_size, fast, device),
            name != "bare loop",
            device,
            precision,
            compile,
        )
        for name in BARE
    }
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
    task = make_task(norm, compile)
    trainer.fit(task, datamodule=InMemoryCIFAR10(dataset, batch_size, fast))
    loader = trainer.train_dataloader
    assert isinstance(loader, DeviceBatches) == fast, type(loader).__name__
    assert (task.compiled_with is not None) == fast
    count = len(timer.times["lightning"])  # the last step has no next start
    return {name: values[WARMUP:count] for name, values in timer.times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed steps")
    parser.add_argument("--norms", nargs="*", default=["none", "dn*"])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the fast path (inductor: compile=True)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    allocator.add_flag(parser)
    args = parser.parse_args()
    allocator.apply_flag(args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*CIFAR-10.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {where}, ", end="")
    print(f"threads {torch.get_num_threads()}, precision {args.precision}")
    options = compile_options(compile_spec(True, args.compile_backend), device)
    print(
        f"small CNN, batch {args.batch_size} of 3x32x32 uint8 (mean image subtracted), median "
        f"of {args.repeats} steps, the three loops of a path in lock-step; fast path: "
        f"device-resident batches, torch.compile({options})"
    )
    header = f"{'norm':<7}{'path':<8}{'loop':<15}{'ms/step':>8}{'images/s':>10}"
    print(header + f"{'lightning overhead':>20}{'x none':>8}{'x loader':>10}")
    medians: dict[tuple[str, str, str], float] = {}
    overheads: dict[tuple[str, str, str], float] = {}
    for norm in args.norms:
        for path in args.paths:
            fast = path == "fast"
            times = measure(
                norm,
                path,
                args.batch_size,
                args.repeats,
                device,
                args.precision,
                args.compile_backend,
            )
            light = times["lightning"]
            for name, values in times.items():
                ms = medians[norm, path, name] = statistics.median(values)
                overhead = ""
                if name != "lightning":
                    ratios = [a / b for a, b in zip(light, values, strict=True)]
                    overheads[norm, path, name] = statistics.median(ratios) - 1
                    overhead = f"{overheads[norm, path, name]:+.1%}"
                versus_none = _ratio(medians, ("none", path, name), ms)
                versus_loader = _ratio(medians, (norm, "loader", name), ms) if fast else "-"
                line = f"{norm:<7}{path:<8}{name:<15}{ms:8.1f}{args.batch_size / ms * 1e3:10.0f}"
                print(line + f"{overhead:>20}{versus_none:>8}{versus_loader:>10}")
    for norm in args.norms:
        if (norm, "fast", "lightning") in medians and (norm, "loader", "lightning") in medians:
            ratio = medians[norm, "fast", "lightning"] / medians[norm, "loader", "lightning"]
            overhead = overheads[norm, "fast", "bare loop"]
            print(
                f"{norm}: fast-path Lightning step {ratio:.2f}x the DataLoader step (target "
                f"<= 0.80), Lightning overhead on the fast path {overhead:+.1%} (target <= 5%)"
            )


def _ratio(medians: dict, key: tuple[str, str, str], ms: float) -> str:
    against = medians.get(key)
    return f"{ms / against:.2f}" if against else "-"


if __name__ == "__main__":
    main()
