"""``ClassificationTask``: image classification (CIFAR-10/100) with any norm of the registry.

    loss = cross_entropy(model(x), y) + sparsity_penalty(model)      (training)

Logs ``{stage}/loss`` and ``{stage}/acc`` (top-1) for ``stage`` in train, val, test, plus
``{stage}/acc_top5`` when there are at least 100 classes; the base class adds ``train/l1``
(for a model with an L1 penalty) and every learned ``sigma/<layer>``. Training accuracy is the
batch's, logged per step and averaged over the epoch weighted by batch size (which is the
epoch's micro accuracy, on each rank's own batches like ``train/loss``); validation and test
accuracy are torchmetrics states gathered over every rank.

The network is built from arguments (``arch="small_cnn"`` or ``"resnet"``), is any
torchvision classification model by name (``arch="torchvision:resnet18"``, random weights),
or is passed in as an ``nn.Module``. ``norm`` switches the normalization of the whole built
network, so from the command line ``--model.norm dn*`` or
``--model.norm '{name: bn, sigma: 0.01}'`` turns any config into another row of the paper's
table; for a torchvision model it converts the model's own norm layers
(:func:`~lit_divnorm.norm.convert_norms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy

from lit_divnorm.models.resnet import BlockKind, PreActResNet
from lit_divnorm.models.small_cnn import SmallCNN
from lit_divnorm.norm import NormSpec, convert_norms
from lit_divnorm.tasks.base import NormalizedTask, Stage, _default_optimizer

ARCHITECTURES: tuple[str, ...] = ("small_cnn", "resnet")
TORCHVISION_PREFIX = "torchvision:"
EVAL_STAGES: tuple[Stage, ...] = ("val", "test")
# their auxiliary heads make the training output a tuple; the task trains the main head only
_TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False},
    "inception_v3": {"aux_logits": False},
}


def build_torchvision_classifier(name: str, num_classes: int, norm: NormSpec = None) -> nn.Module:
    """torchvision's classification model ``name`` (``"resnet18"``, ``"convnext_tiny"``, ...)
    with random weights (``weights=None``, nothing downloads) and ``num_classes`` outputs.

    ``norm`` ``None`` keeps the model's own norm layers; any other spec replaces every one of
    them (:func:`~lit_divnorm.norm.convert_norms`; ``"none"`` removes them).
    """
    from torchvision import models

    known = models.list_models(module=models)
    if name not in known:
        raise ValueError(
            f"arch {TORCHVISION_PREFIX}{name!r} is not a torchvision classification model; "
            f"known: {', '.join(known)}"
        )
    kwargs = _TORCHVISION_KWARGS.get(name, {})
    model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return model if norm is None else convert_norms(model, norm)


def build_classifier(
    arch: str,
    num_classes: int,
    norm: NormSpec = None,
    layer_window: Sequence[int] | None = None,
    dropout: float = 0.0,
    depth: int | None = None,
    block: BlockKind | None = None,
) -> nn.Module:
    """Build ``"small_cnn"`` (:class:`SmallCNN`), ``"resnet"`` (:class:`PreActResNet`) or
    ``"torchvision:<name>"`` (:func:`build_torchvision_classifier`).

    ``layer_window`` ``None`` keeps the architecture's paper windows (5, 3, 3 / 7, 5, 5, 5);
    ``depth`` and ``block`` apply to the ResNet only (default 32, ``"basic"``); a torchvision
    model takes none of ``layer_window``, ``dropout``, ``depth``, ``block``.
    """
    if isinstance(arch, str) and arch.startswith(TORCHVISION_PREFIX):
        given = {"layer_window": layer_window, "depth": depth, "block": block}
        given = {key: value for key, value in given.items() if value is not None}
        if dropout:
            given["dropout"] = dropout
        if given:
            raise ValueError(
                f"{', '.join(given)} apply to arch 'small_cnn'/'resnet' only, got {given} with "
                f"arch={arch!r}"
            )
        return build_torchvision_classifier(arch[len(TORCHVISION_PREFIX) :], num_classes, norm)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "norm": norm, "dropout": dropout}
    if layer_window is not None:
        kwargs["layer_window"] = tuple(layer_window)
    if arch == "small_cnn":
        if depth is not None or block is not None:
            raise ValueError(
                f"depth and block apply to arch='resnet' only, got depth={depth!r}, "
                f"block={block!r} with arch='small_cnn'"
            )
        return SmallCNN(**kwargs)
    if arch == "resnet":
        return PreActResNet(depth=32 if depth is None else depth, block=block or "basic", **kwargs)
    raise ValueError(
        f"arch must be one of {ARCHITECTURES}, '{TORCHVISION_PREFIX}<model name>' or an "
        f"nn.Module, got {arch!r}"
    )


class ClassificationTask(NormalizedTask):
    """Cross-entropy classification with top-1 (and top-5) accuracy.

    Args:
        arch: ``"small_cnn"`` (the paper's CNN), ``"resnet"`` (pre-activation ResNet),
            ``"torchvision:<name>"`` (a torchvision classification model, random weights, e.g.
            ``"torchvision:resnet18"``), or a ready ``nn.Module`` mapping ``(N, C, H, W)`` to
            logits ``(N, num_classes)``.
        num_classes: number of classes (10 or 100); top-5 accuracy is logged from 100 on.
        norm: the norm of every slot of a built network: a registry name (``"dn*"``), a
            mapping with overrides (``{"name": "bn", "sigma": 0.01}``), or ``None`` (none;
            for a torchvision model ``None`` keeps its own norms and a spec replaces them).
            Must stay ``None`` when ``arch`` is a module.
        layer_window: per-layer DN windows (small CNN: 3 entries; ResNet: 3 stages + final);
            ``None`` keeps the paper's.
        dropout: dropout before the fully connected layer(s).
        depth, block: ResNet depth (32, 110, 164) and block kind (``"basic"``,
            ``"bottleneck"``).
        optimizer, lr_scheduler, scheduler_interval, compile: see :class:`NormalizedTask`.
    """

    def __init__(
        self,
        arch: str | nn.Module = "small_cnn",
        num_classes: int = 10,
        norm: NormSpec = None,
        layer_window: list[int] | None = None,
        dropout: float = 0.0,
        depth: int | None = None,
        block: Literal["basic", "bottleneck"] | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, scheduler_interval, compile)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        ignore = ["optimizer", "lr_scheduler", "compile"]
        if isinstance(arch, nn.Module):
            if norm is not None or layer_window is not None or depth is not None:
                raise ValueError(
                    "norm, layer_window and depth build a network; they must stay None when "
                    f"arch is an nn.Module ({type(arch).__name__})"
                )
            self.model = arch
            ignore.append("arch")
        else:
            self.model = build_classifier(
                arch, num_classes, norm, layer_window, dropout, depth, block
            )
        self.save_hyperparameters(ignore=ignore)
        self.num_classes = num_classes
        self.top_k = (1, 5) if num_classes >= 100 else (1,)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for stage in EVAL_STAGES
                for k in self.top_k
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.model(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: Stage) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        size = labels.shape[0]
        self.log_loss(stage, loss, size)
        for k in self.top_k:
            name = f"{stage}/acc" if k == 1 else f"{stage}/acc_top{k}"
            if stage == "train":  # a tensor: a Metric object costs Lightning a .to() per step
                accuracy = multiclass_accuracy(
                    logits.detach(), labels, self.num_classes, top_k=k, average="micro"
                )
                self.log(
                    name, accuracy, on_step=True, on_epoch=True, batch_size=size, prog_bar=k == 1
                )
            else:
                metric = self.metrics[f"{stage}_top{k}"]
                metric.update(logits.detach(), labels)
                self.log(
                    name, metric, on_step=False, on_epoch=True, batch_size=size, prog_bar=k == 1
                )
        return loss
