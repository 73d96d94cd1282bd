"""Norm layers survive copies: deepcopy, pickle, AveragedModel and Lightning's EMA callback.

The L1 records are graph tensors of the current step; a copy made between a training forward
and the penalty (an EMA/SWA model built after a shape probe, a checkpoint of the whole module)
must work, start with no records, and leave the original's pending penalty as it was.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from lit_divnorm.norm import build_norm, records_sparsity, sparsity_penalty
from lit_divnorm.tasks.classification import ClassificationTask


def _dn_star_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        build_norm("dn*", 4, window=3, l1=0.01),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        build_norm("bn*", 4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def _expected_penalty(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The published term by hand: sum over L1 layers of l1 * mean|z - mean_A(z)|."""
    conv1, dn, _, conv2, bn = model[:5]
    z1 = conv1(x)
    pad = F.pad(z1, (1, 1, 1, 1))  # 3x3 window over all channels, "valid" border: mean inside
    ones = F.pad(torch.ones_like(z1[:, :1]), (1, 1, 1, 1))
    box = F.avg_pool2d(pad.sum(1, keepdim=True), 3, stride=1)
    count = F.avg_pool2d(ones, 3, stride=1) * z1.shape[1]
    v1 = z1 - box / count
    dn.eval()  # dn* computes the same without recording a term
    z2 = conv2(torch.relu(dn(z1)))
    dn.train()
    v2 = z2 - z2.mean(dim=(0, 2, 3), keepdim=True)
    return dn.l1 * v1.abs().mean() + bn.l1 * v2.abs().mean()


@pytest.mark.parametrize("make_copy", ["deepcopy", "pickle", "averaged_model"])
def test_copy_after_a_training_forward_starts_empty_and_keeps_the_pending_penalty(make_copy):
    model = _dn_star_model().train()
    x = torch.randn(4, 3, 6, 6)
    model(x)  # records, not consumed yet
    if make_copy == "deepcopy":
        clone = copy.deepcopy(model)
    elif make_copy == "pickle":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    else:
        clone = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)).module
    assert float(sparsity_penalty(clone)) == 0.0
    assert records_sparsity(clone)  # it is a copy of layers that did record
    torch.testing.assert_close(sparsity_penalty(model), _expected_penalty(model, x))
    for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    clone(x)  # the copy records its own terms from now on
    torch.testing.assert_close(sparsity_penalty(clone), _expected_penalty(clone, x))


def test_records_pickle_without_their_graph():
    model = _dn_star_model().train()
    model(torch.randn(2, 3, 6, 6))
    records = model[1].sparsity_terms
    assert len(records) == 1 and records[0].requires_grad
    assert pickle.loads(pickle.dumps(records)) == []
    assert copy.copy(records) == [] and copy.deepcopy(records) == []


def test_averaged_model_of_a_dn_star_model_averages_the_weights():
    model = _dn_star_model().train()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    first = [p.detach().clone() for p in model.parameters()]
    ema.update_parameters(model)
    model(torch.randn(2, 3, 6, 6))  # pending records while the average is updated again
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for averaged, start, now in zip(ema.module.parameters(), first, model.parameters()):
        torch.testing.assert_close(averaged, 0.5 * start + 0.5 * now.detach())


class RecordWeights(Callback):
    """The model's parameters after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append([p.detach().clone() for p in pl_module.parameters()])


def test_lightning_ema_during_a_fit_of_the_classification_task():
    """EMAWeightAveraging copies the task at setup, here right after a training-mode shape
    probe (pending L1 records); at the end the task holds the EMA of the step weights."""
    torch.manual_seed(0)
    task = ClassificationTask(arch=_dn_star_model(), num_classes=3, optimizer=torch.optim.Adam)
    assert task(torch.randn(2, 3, 6, 6)).shape == (2, 3)  # the probe, in training mode
    data = TensorDataset(torch.randn(12, 3, 6, 6), torch.randint(0, 3, (12,)))
    recorder, decay = RecordWeights(), 0.6
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EMAWeightAveraging(decay=decay), recorder],
    )
    trainer.fit(task, DataLoader(data, batch_size=4))
    assert len(recorder.steps) == 3
    expected = recorder.steps[0]
    for weights in recorder.steps[1:]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    for name_param, value in zip(task.named_parameters(), expected, strict=True):
        torch.testing.assert_close(name_param[1].detach(), value, msg=name_param[0])
    assert not all(torch.equal(a, b) for a, b in zip(recorder.steps[-1], expected))
