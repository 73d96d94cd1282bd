"""``LanguageModelTask``: word-level language modelling with truncated BPTT (the paper's PTB).

Batches are consecutive windows ``(inputs, targets)`` of ``N`` parallel token streams, each
``(N, T)`` (see ``datamodules.ptb``). The hidden state at the end of a window starts the next
one, detached from the graph (truncated back-propagation through time); it is reset to zeros at
the start of every training, validation and test epoch. The training state travels in every
checkpoint (``checkpoint["carried_state"]``), so a run resumed inside an epoch continues from
the state the killed run had reached. The training loss is the paper's: the
cross-entropy summed over the ``T`` steps and averaged over the ``N`` streams, plus the sparsity
penalty of the norms (added by :class:`NormalizedTask`)::

    loss = sum_{n, t} CE(logits[n, t], targets[n, t]) / N + sparsity_penalty
    perplexity = exp(sum of CE over the epoch / number of tokens)

Gradient-norm clipping (the paper: global norm 5) is the trainer's ``gradient_clip_val``; the
paper's schedule (plain SGD, the rate halved every epoch from the 5th) is a ``MultiStepLR`` with
``milestones: [4, 5, ..., 12]``, ``gamma: 0.5`` and ``scheduler_interval: epoch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric

from lit_divnorm.models.rnn import Placement
from lit_divnorm.models.rnn_lm import (
    CellType,
    RNNLanguageModel,
    clone_state,
    detach_state,
    state_batch_size,
)
from lit_divnorm.norm.registry import NormSpec
from lit_divnorm.tasks.base import NormalizedTask, Stage


def _default_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1.0)


class Perplexity(Metric):
    """``exp(total cross-entropy / total tokens)``, summed over batches and (under DDP) ranks.

    ``update(nll_sum, tokens)`` takes the summed token cross-entropy of a batch and its count.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: int | Tensor) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.tokens += tokens

    def compute(self) -> Tensor:
        return torch.exp(self.nll_sum / self.tokens).to(torch.float32)


class LanguageModelTask(NormalizedTask):
    """Train and evaluate an :class:`RNNLanguageModel` with truncated BPTT.

    Args:
        vocab_size: ``V``; must equal the data module's vocabulary size (10,000 for PTB).
        cell, hidden_sizes, norm, norm_window, placement, time_steps, init_scale: the model
            (see :class:`RNNLanguageModel`).
        carry_state: carry the hidden state from one window to the next (default; the paper).
            ``False`` starts every window from zeros (an ablation).
        optimizer, lr_scheduler, scheduler_interval, compile: see :class:`NormalizedTask`;
            the paper's schedule is stepped per epoch. Compiled, the LSTM runs its step loop
            over the norm modules (the fused CPU kernels do not trace).
    """

    def __init__(
        self,
        vocab_size: int = 10000,
        cell: CellType = "lstm",
        hidden_sizes: Sequence[int] = (200, 200),
        norm: NormSpec = None,
        norm_window: int | None = None,
        placement: Placement = "auto",
        time_steps: int = 20,
        init_scale: float = 0.1,
        carry_state: bool = True,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "epoch",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, scheduler_interval, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "compile"])
        self.model = RNNLanguageModel(
            vocab_size,
            cell=cell,
            hidden_sizes=hidden_sizes,
            norm=norm,
            norm_window=norm_window,
            placement=placement,
            time_steps=time_steps,
            init_scale=init_scale,
        )
        self.carry_state = carry_state
        self.train_perplexity = Perplexity()
        self.val_perplexity = Perplexity()
        self.test_perplexity = Perplexity()
        self._states: dict[str, Any] = {}

    def forward(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return self.model(tokens, state)

    # ------------------------------------------------------------ hidden state
    def reset_state(self, stage: Stage | None = None) -> None:
        """Forget the carried hidden state of ``stage`` (of every stage when ``None``)."""
        if stage is None:
            self._states.clear()
        else:
            self._states.pop(stage, None)

    def on_fit_start(self) -> None:
        self._check_vocabulary()

    def on_validation_start(self) -> None:
        self._check_vocabulary()

    def on_test_start(self) -> None:
        self._check_vocabulary()

    def on_train_epoch_start(self) -> None:
        self.reset_state("train")

    def on_validation_epoch_start(self) -> None:
        self.reset_state("val")

    def on_test_epoch_start(self) -> None:
        self.reset_state("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the carried training state (tensors in nested tuples: weights-only safe)."""
        checkpoint["carried_state"] = self._states.get("train")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the configuration (see :class:`NormalizedTask`) and take back the carried
        training state; the first window after a resume inside an epoch starts from it."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("carried_state")
        if state is None:
            self._states.pop("train", None)
        else:
            self._states["train"] = state

    def _check_vocabulary(self) -> None:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        data_size = getattr(datamodule, "vocab_size", None)
        if data_size is not None and data_size != self.model.vocab_size:
            raise ValueError(
                f"vocab_size={self.model.vocab_size} of the model does not match the data's "
                f"vocabulary of {data_size} words; set model vocab_size: {data_size}"
            )

    # ------------------------------------------------------------ steps
    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: Stage) -> Tensor:
        inputs, targets = batch
        if inputs.ndim != 2 or inputs.shape != targets.shape:
            raise ValueError(
                "a batch must be (inputs, targets) of equal shape (N, T), got "
                f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        state = self._states.get(stage) if self.carry_state else None
        if state_batch_size(state) not in (None, inputs.shape[0]):
            state = None
        state = move_data_to_device(state, inputs.device)
        logits, state = self.model(inputs, state)
        state = detach_state(state)
        if self.uses_cuda_graphs:  # the next replay overwrites the graph's outputs
            state = clone_state(state)
        self._states[stage] = state
        nll_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        loss = nll_sum / inputs.shape[0]
        metric = getattr(self, f"{stage}_perplexity")
        metric.update(nll_sum, targets.numel())
        batch_size = inputs.shape[0]
        self.log_loss(stage, loss, batch_size)
        self.log(
            f"{stage}/ppl",
            metric,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
        )
        return loss
