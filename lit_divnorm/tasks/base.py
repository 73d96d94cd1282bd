"""``NormalizedTask``: what every task of the project shares.

* the wrapped ``self.model`` (a plain ``nn.Module`` whose norm slots come from the registry);
* the loss ``task_loss + sparsity_penalty(model)`` (the paper's L1 on centred activations);
* logging of the L1 term and of every learned ``sigma``;
* the optimizer and LR schedule injected from the CLI (``OptimizerCallable`` /
  ``LRSchedulerCallable``), with the schedule stepped per iteration by default, since the
  paper counts its step boundaries in iterations;
* under ``Trainer(sync_batchnorm=True)``, with or without the CLI, the batch fields of the
  model's own norms are synchronized over the ranks too (``setup`` installs
  :class:`~lit_divnorm.distributed.NormSync`; a subclass that overrides ``setup`` calls
  ``super().setup(stage)``);
* an opt-in compiled step (``compile``): ``setup`` compiles ``self.model`` in place with
  ``torch.compile`` (``nn.Module.compile``: the weights' names, checkpoints and the optimizer
  are those of the eager model), with CUDA graphs (``mode="reduce-overhead"``) on a CUDA
  device; the norms are custom operators that trace without a graph break, and the sparsity
  penalty is recorded inside the compiled graph.

Subclasses implement ``_shared_step(batch, stage)`` returning the task loss; the base class
adds the penalty in training and logs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import IO, Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_divnorm.checkpoint import check_compatible, load_checkpoint_safely
from lit_divnorm.distributed import use_norm_sync
from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.sparsity import clear_sparsity, records_sparsity, sparsity_penalty

Stage = Literal["train", "val", "test"]
CompileSpec = bool | dict[str, Any]
COMPILE_KEYWORDS: tuple[str, ...] = (
    "fullgraph",
    "dynamic",
    "backend",
    "mode",
    "options",
    "disable",
)
CUDA_GRAPH_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune")


def _default_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def check_compile(compile: Any) -> CompileSpec:
    """``compile`` itself when it is a bool or a mapping of ``torch.compile`` keywords
    (``fullgraph, dynamic, backend, mode, options, disable``), as a dict; else an error."""
    if isinstance(compile, bool):
        return compile
    if not isinstance(compile, Mapping):
        raise TypeError(
            f"compile must be a bool or a dict of torch.compile keywords, got {compile!r} "
            f"({type(compile).__name__})"
        )
    unknown = sorted(str(key) for key in compile if key not in COMPILE_KEYWORDS)
    if unknown:
        raise ValueError(
            f"compile has unknown torch.compile keyword(s) {unknown}; allowed: "
            f"{', '.join(COMPILE_KEYWORDS)}"
        )
    return dict(compile)


def compile_options(compile: CompileSpec, device: torch.device) -> dict[str, Any] | None:
    """The ``torch.compile`` keywords of ``compile`` on ``device``, ``None`` for eager.

    ``True``: ``{"mode": "reduce-overhead"}`` (inductor with CUDA graphs) on a CUDA device,
    ``{}`` (inductor's default) elsewhere; a dict: those keywords as given.
    """
    compile = check_compile(compile)
    if compile is False:
        return None
    if compile is True:
        return {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    return compile


class NormalizedTask(LightningModule):
    """Base LightningModule of the project's tasks.

    Args:
        optimizer: builds the optimizer from the parameters (default SGD, lr 1e-3,
            momentum 0.9, the paper's CIFAR setting).
        lr_scheduler: builds the LR schedule from the optimizer, or ``None``.
        scheduler_interval: ``"step"`` (default; the paper's boundaries are iterations) or
            ``"epoch"``.
        compile: run the model compiled (``torch.compile``; from the command line
            ``--model.compile true``): ``False`` (default) eager; ``True`` inductor, with CUDA
            graphs (``mode="reduce-overhead"``) on a CUDA device; a dict is passed to
            ``torch.compile`` as it is (e.g. ``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune", "fullgraph": True}``). It changes how the model runs,
            not what it computes, so it is not a hyper-parameter: checkpoints of compiled and
            eager runs resume in either.
    """

    model: nn.Module

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        compile: CompileSpec = False,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.compile_spec = check_compile(compile)
        self.compiled_with: dict[str, Any] | None = None  # the keywords, once compiled

    def setup(self, stage: str) -> None:
        """Make ``Trainer(sync_batchnorm=True)`` synchronize the batch statistics of the
        model's ``DivisiveNorm`` layers, not only torch's BatchNorm (see
        :func:`~lit_divnorm.distributed.use_norm_sync`), and compile the model when
        ``compile`` asks for it (for the trainer's device)."""
        if self._trainer is not None:
            use_norm_sync(self._trainer)
            self.compile_model(self._trainer.strategy.root_device)

    def compile_model(self, device: torch.device) -> None:
        """Compile ``self.model`` in place (``nn.Module.compile``) with the keywords of
        ``compile`` for ``device``; a no-op when ``compile`` is false or already done."""
        options = compile_options(self.compile_spec, device)
        if options is None or self.compiled_with is not None:
            return
        self.model.compile(**options)
        self.compiled_with = options

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled model replays CUDA graphs on a CUDA device (inductor's mode
        reduce-overhead or max-autotune, its option ``triton.cudagraphs``, or the backend
        ``cudagraphs``): its outputs are overwritten by the next replay, so what is kept
        across steps is cloned and every step is marked."""
        options = self.compiled_with
        if options is None or self.device.type != "cuda":
            return False
        inductor_options = options.get("options") or {}
        return (
            options.get("mode") in CUDA_GRAPH_MODES
            or options.get("backend") == "cudagraphs"
            or bool(inductor_options.get("triton.cudagraphs"))
        )

    def _mark_step(self) -> None:
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._mark_step()

    def on_validation_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._mark_step()

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._mark_step()

    def _shared_step(self, batch: Any, stage: Stage) -> Tensor:
        """Compute and log the task loss of one batch (without the sparsity penalty)."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        clear_sparsity(self.model)
        loss = self._shared_step(batch, "train")
        penalty = sparsity_penalty(self.model)
        self.log_sparsity(penalty)
        self.log_sigmas()
        return loss + penalty

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint saved from another configuration (before any weight is loaded).

        Raises :class:`~lit_divnorm.checkpoint.CheckpointMismatchError` naming the differing
        hyper-parameters and weights, instead of a silent or partial load.
        """
        check_compatible(checkpoint, self.hparams, self.state_dict(), type(self).__name__)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike | IO,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, always weights-only and config-checked.

        The file is first read with :func:`~lit_divnorm.checkpoint.load_checkpoint_safely`
        (``ValueError`` naming what it holds when it is not plain tensors and containers:
        nothing in it runs), then Lightning builds the task with ``weights_only=True``, and
        :meth:`on_load_checkpoint` refuses weights of another configuration (e.g. a ``kwargs``
        override of a hyper-parameter). ``weights_only=False`` is refused.
        """
        if weights_only is False:
            raise ValueError(
                "weights_only=False is refused: lit-divnorm reads checkpoints weights-only so "
                "that no code stored in a file runs; leave weights_only out"
            )
        if isinstance(checkpoint_path, (str, os.PathLike)):
            load_checkpoint_safely(checkpoint_path)
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True,
            **kwargs,
        )

    def log_loss(self, stage: Stage, loss: Tensor, batch_size: int) -> None:
        """Log ``<stage>/loss``: per step and per epoch in training; per epoch, averaged over
        every rank's samples, in validation and test."""
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=stage != "train",
        )

    def log_sparsity(self, penalty: Tensor) -> None:
        """Log ``train/l1``, the step's sparsity penalty, for a model that has one (a model
        without any ``l1`` weight skips it: a column of zeros, and a log call per step)."""
        if records_sparsity(self.model):
            self.log("train/l1", penalty.detach(), on_step=True, on_epoch=True, batch_size=1)

    def learned_sigmas(self) -> dict[str, Tensor]:
        """``{module name: sigma}`` for every norm layer of the model with a learned sigma."""
        return {
            name: module.sigma
            for name, module in self.model.named_modules()
            if isinstance(module, DivisiveNorm) and module.learn_sigma
        }

    def log_sigmas(self) -> None:
        for name, sigma in self.learned_sigmas().items():
            self.log(f"sigma/{name}", sigma.detach(), on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
