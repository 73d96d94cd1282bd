"""Callbacks for long unattended runs: resumable checkpoints and a non-finite detector.

* :class:`ResumeCheckpoint` writes ``last.ckpt`` every ``every_n_train_steps`` optimizer
  steps and after the last batch of every training epoch (atomically, through the
  :class:`~lit_divnorm.checkpoint.AtomicCheckpointIO` that ``DivNormCLI`` installs), together
  with the random-number-generator states, so ``lit-divnorm fit ... --ckpt_path last``
  continues a killed run from any of its checkpoints and ends with the same weights as an
  uninterrupted run (Lightning stores the position of the project's training loaders,
  :class:`~datamodules.order.ResumableLoader`, in the same file). On SIGINT, SIGTERM or
  SLURM's SIGUSR1 it saves ``last.ckpt`` at the current step, marks the run ``STOPPED`` and
  stops it (:mod:`lit_divnorm.stopping`).
* :class:`NonFiniteDetector` (opt-in) stops training with :class:`NonFiniteError` when the
  loss or a gradient is NaN/inf, naming the global step and the first layer (in execution
  order) whose output went non-finite, instead of training on garbage.
* :class:`PeriodicTest` (opt-in) evaluates the test split every ``every_n_steps`` optimizer
  steps and logs ``test/acc`` (``test/ppl``, ``test/psnr``) by step into the run's metrics,
  for the paper's CIFAR protocol, which has no validation split.

Enable from the command line:

    lit-divnorm fit --config ... --trainer.callbacks+=lit_divnorm.callbacks.NonFiniteDetector
    lit-divnorm fit --config ... --trainer.callbacks+=lit_divnorm.callbacks.PeriodicTest \
        --trainer.callbacks.every_n_steps=2000
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lit_divnorm.stopping import (
    STOPPED_MARKER,
    RunStopped,
    install_stop_handlers,
    requeue_slurm_job,
    stop_requested,
    write_stopped_marker,
)


def capture_rng_states() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys).astype(np.int64)),
            pos,
            has_gauss,
            cached,
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states`."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and after every epoch's last batch.

    Args:
        dirpath: folder of ``last.ckpt``; ``None`` is Lightning's default
            (``<logger log_dir>/checkpoints``). Give the logger a fixed ``version`` (or set
            ``dirpath``) so that a resumed run finds the folder of the killed one.
        every_n_train_steps: optimizer steps between checkpoints (0: epoch ends only).

    The checkpoint also stores the RNG states (torch, CUDA, numpy, Python), restored before
    the first batch after a resume, so dropout masks continue as in the uninterrupted run;
    with the project's datamodules the data order, augmentation and (PTB) the carried hidden
    state continue too, from a checkpoint at any step, mid-epoch included. A datamodule whose
    train loader keeps no state (a plain ``DataLoader``) is replayed exactly only from an
    epoch-end checkpoint.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 1000) -> None:
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int):
            raise TypeError(f"every_n_train_steps must be an int, got {every_n_train_steps!r}")
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def _fitting(self, trainer: Trainer) -> bool:
        return not (
            trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Save every ``every_n_train_steps`` steps, after the last batch of every epoch and
        at the final step (``max_steps``), so ``last.ckpt`` holds the weights training ended
        with.

        The epoch's checkpoint is written at the end of its last batch rather than in
        ``on_train_epoch_end``: Lightning resumes a batch-end checkpoint into the next epoch
        with the right epoch number and step counter in every case, whereas a step-limited
        run (``max_steps``) resumed from an ``on_train_epoch_end`` checkpoint counts that
        epoch twice (its next epoch would read another epoch's data order).
        """
        signum = self._stop_signal(trainer)
        if not self._fitting(trainer) or self._last_global_step_saved == trainer.global_step:
            if signum is not None:
                self._stop(trainer, signum)
            return
        every, step = self._every_n_train_steps, trainer.global_step
        at_step = every >= 1 and step % every == 0
        at_end = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or (
            trainer.max_steps != -1 and step >= trainer.max_steps
        )
        if at_step or at_end or signum is not None:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if signum is not None:
            self._stop(trainer, signum)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Install the stop handlers (:mod:`lit_divnorm.stopping`) for a fit."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            install_stop_handlers()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run that starts again (``--ckpt_path last``) is no longer stopped: its
        ``STOPPED`` marker goes."""
        super().on_train_start(trainer, pl_module)
        marker = Path(trainer.log_dir or trainer.default_root_dir) / STOPPED_MARKER
        if trainer.is_global_zero and marker.is_file():
            marker.unlink()

    @staticmethod
    def _stop_signal(trainer: Trainer) -> int | None:
        """The pending stop request, the same on every rank (reduced over them)."""
        signum = stop_requested()
        if trainer.world_size > 1:
            anyone = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
            if anyone and signum is None:
                signum = signal.SIGTERM  # another rank was signalled
        return signum

    def _stop(self, trainer: Trainer, signum: int) -> None:
        """After ``last.ckpt`` at this step: the ``STOPPED`` marker, a SLURM requeue on
        SIGUSR1, then :class:`~lit_divnorm.stopping.RunStopped`."""
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            write_stopped_marker(run_dir, signum, trainer.global_step)
            if signum == getattr(signal, "SIGUSR1", None):
                requeue_slurm_job()
        raise RunStopped(signum, trainer.global_step, run_dir)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng_states": capture_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng_states = state_dict.pop("rng_states", None)
        super().load_state_dict(state_dict)
        if rng_states is not None:
            restore_rng_states(rng_states)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class NonFiniteDetector(Callback):
    """Stop training at the first NaN/inf loss or gradient and say where it came from.

    Forward hooks on every submodule record, per training batch, whether each module's
    floating-point output was finite (one small flag tensor per module; read only when the
    loss or a gradient is non-finite). The error names the global step, the epoch and batch,
    and the first module, in the order the modules finished their forward pass, whose output
    held a NaN or inf (for a nested model the innermost layer comes first); for a gradient it
    names the first parameter whose gradient is non-finite.

    Args:
        check_gradients: also check every gradient before the optimizer step.
    """

    def __init__(self, check_gradients: bool = True) -> None:
        self.check_gradients = check_gradients
        self._handles: list[RemovableHandle] = []
        self._flags: list[tuple[str, nn.Module, Tensor]] = []
        self._recording = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.teardown(trainer, pl_module, stage)
        for name, module in pl_module.named_modules():
            if module is pl_module:
                continue
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._recording:
                return
            flags = [torch.isfinite(t).all() for t in _tensors(output) if t.is_floating_point()]
            if flags:
                self._flags.append((name, module, torch.stack(flags).all()))

        return record

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flags = []
        self._recording = True
        self._batch_idx = batch_idx

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor
    ) -> None:
        self._recording = False
        if bool(torch.isfinite(loss.detach()).all()):
            self._flags = []
            return
        raise NonFiniteError(
            f"{self._where(trainer)}: the training loss is {loss.detach().float().item()}; "
            f"{self._first_bad_layer()}. Training was stopped so that it does not go on with "
            "garbage; lower the learning rate, raise sigma/eps, or clip gradients."
        )

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._recording = False
        if not self.check_gradients:
            return
        for name, parameter in pl_module.named_parameters():
            grad = parameter.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                raise NonFiniteError(
                    f"{self._where(trainer)}: the gradient of parameter '{name}' is not finite "
                    f"(the loss was finite); {self._first_bad_layer()}. Training was stopped; "
                    "lower the learning rate, raise sigma/eps, or clip gradients."
                )
        self._flags = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._recording = False
        self._flags = []

    def _where(self, trainer: Trainer) -> str:
        return (
            f"non-finite value at global step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}, batch {getattr(self, '_batch_idx', '?')})"
        )

    def _first_bad_layer(self) -> str:
        if not self._flags:
            return "no layer output was recorded"
        finite = torch.stack([flag for _, _, flag in self._flags]).tolist()
        for (name, module, _), ok in zip(self._flags, finite):
            if not ok:
                return (
                    f"the first layer whose output went non-finite is '{name}' "
                    f"({type(module).__name__})"
                )
        return "every layer's output was finite, so the loss computation itself overflowed"


class PeriodicTest(Callback):
    """Evaluate the test split every ``every_n_steps`` optimizer steps and log it by step.

    After optimizer step ``S`` (``S`` a multiple of ``every_n_steps``) the model is put in
    eval mode, run without gradients over the datamodule's whole ``test_dataloader()`` (its
    batches moved to the device as Lightning moves them, with the trainer in its testing
    stage, so no training augmentation applies), and the figures are sent to every logger at
    step ``S`` (``metrics.csv`` of the run: a ``test/acc`` column by step, which
    ``lit-divnorm report`` plots; the sweep's final test comes after them):

    * :class:`~lit_divnorm.tasks.ClassificationTask`: ``test/acc`` = correct / N (top-1)
      and ``test/loss`` = mean cross-entropy over the N test images;
    * :class:`~lit_divnorm.tasks.LanguageModelTask`: ``test/ppl`` = exp(summed token
      cross-entropy / tokens), the hidden state carried across the test windows as the task's
      test does;
    * :class:`~lit_divnorm.tasks.SuperResolutionTask`: ``test/psnr`` and ``test/ssim``, means
      over the test images.

    Training is left as it was: the mode of every module, and the random number states
    (restored after each evaluation), so a run with this callback trains exactly as one
    without it. A run continued from a checkpoint at step ``S`` evaluates step ``S`` again
    (the resumed ``metrics.csv`` drops the killed run's rows from ``S`` on). Under DDP each
    rank evaluates what its test loader yields (the whole split from a ``DataLoader``, or its
    shard) and the sums (correct images, cross-entropy, token losses, PSNR) are added over
    the ranks, so the figure is the whole split's either way; the loggers write rank 0's.

    Args:
        every_n_steps: optimizer steps between evaluations (2000: the shared CIFAR run's).
    """

    def __init__(self, every_n_steps: int = 2000) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be an int, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._loader: Any = None
        self._last_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._evaluator(pl_module)  # refuse an unsupported task before training starts
            self._loader, self._last_step = None, -1

    @staticmethod
    def _evaluator(pl_module: LightningModule):
        from lit_divnorm.tasks import ClassificationTask, LanguageModelTask, SuperResolutionTask

        for kind, evaluate in (
            (ClassificationTask, _test_classifier),
            (LanguageModelTask, _test_language_model),
            (SuperResolutionTask, _test_super_resolution),
        ):
            if isinstance(pl_module, kind):
                return evaluate
        raise TypeError(
            "PeriodicTest evaluates ClassificationTask, LanguageModelTask or "
            f"SuperResolutionTask (and their subclasses), got {type(pl_module).__name__}"
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:  # resumed at an evaluation step
            self._test_and_log(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or trainer.fast_dev_run or step == self._last_step:
            return
        if step > 0 and step % self.every_n_steps == 0:
            self._test_and_log(trainer, pl_module)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """The test figures of ``pl_module`` now (see the class docstring), training state
        untouched."""
        from lightning.pytorch.trainer.states import RunningStage

        evaluate = self._evaluator(pl_module)
        if self._loader is None:
            datamodule = trainer.datamodule
            if datamodule is None:
                raise RuntimeError("PeriodicTest needs a datamodule with a test_dataloader()")
            datamodule.setup("test")
            self._loader = datamodule.test_dataloader()
        modes = {module: module.training for module in pl_module.modules()}
        rng_states = capture_rng_states()
        stage = trainer.state.stage
        trainer.state.stage = RunningStage.TESTING
        pl_module.eval()
        try:
            with torch.no_grad():
                batches = (trainer.strategy.batch_to_device(batch) for batch in self._loader)
                return evaluate(pl_module, batches, _summed_over_ranks(trainer))
        finally:
            trainer.state.stage = stage
            for module, training in modes.items():
                module.train(training)
            restore_rng_states(rng_states)

    def _test_and_log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        figures = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)


Summed = Callable[[Tensor], Tensor]  # a tensor summed over the ranks of the run


def _summed_over_ranks(trainer: Trainer) -> Summed:
    def summed(tensor: Tensor) -> Tensor:
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    return summed


def _test_classifier(
    pl_module: LightningModule, batches: Iterator[Any], summed: Summed
) -> dict[str, float]:
    """Top-1 accuracy ``correct / N`` and mean cross-entropy over the ``N`` test images."""
    sums = torch.zeros(3, dtype=torch.float64, device=pl_module.device)  # correct, CE, N
    for images, labels in batches:
        logits = pl_module(images)
        sums[0] += (logits.argmax(dim=1) == labels).sum()
        sums[1] += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        sums[2] += labels.numel()
    correct, cross_entropy, total = summed(sums).tolist()
    if total == 0:
        raise ValueError("PeriodicTest: the test split is empty")
    return {"test/acc": correct / total, "test/loss": cross_entropy / total}


def _test_language_model(
    pl_module: LightningModule, batches: Iterator[Any], summed: Summed
) -> dict[str, float]:
    """Perplexity over the test stream (:class:`~lit_divnorm.tasks.language_model.Perplexity`
    sums over the ranks itself)."""
    from lit_divnorm.models.rnn_lm import detach_state, state_batch_size
    from lit_divnorm.tasks.language_model import Perplexity

    perplexity = Perplexity().to(pl_module.device)
    state = None
    for inputs, targets in batches:
        if not pl_module.carry_state or state_batch_size(state) not in (None, inputs.shape[0]):
            state = None
        logits, state = pl_module(inputs, state)
        state = detach_state(state)
        nll_sum = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        perplexity.update(nll_sum, targets.numel())
    return {"test/ppl": float(perplexity.compute())}


def _test_super_resolution(
    pl_module: LightningModule, batches: Iterator[Any], summed: Summed
) -> dict[str, float]:
    """Mean PSNR and SSIM over the test images (the task's own per-image measures)."""
    from lit_divnorm.tasks.super_resolution import (
        center_crop,
        psnr_per_image,
        ssim_per_image,
        to_pixels,
    )

    sums = torch.zeros(3, dtype=torch.float64, device=pl_module.device)  # PSNR, SSIM, images
    for bicubic, hr in batches:
        output = pl_module(bicubic)
        truth = to_pixels(center_crop(hr, (hr.shape[-1] - output.shape[-1]) // 2))
        sums[0] += psnr_per_image(to_pixels(output), truth).sum()
        sums[1] += ssim_per_image(to_pixels(output), truth).sum()
        sums[2] += output.shape[0]
    psnr, ssim, images = summed(sums).tolist()
    if images == 0:
        raise ValueError("PeriodicTest: the test split is empty")
    return {"test/psnr": psnr / images, "test/ssim": ssim / images}
