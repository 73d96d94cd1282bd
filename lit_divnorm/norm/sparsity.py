"""The L1 sparsity penalty on centred activations (Ren et al., ICLR 2017, section 3.2).

A layer with an ``l1`` weight ``alpha`` records ``alpha * mean(|v|)`` on every training
forward, where ``v = z - mean_A(z)`` is its input centred by its own summation field (for
the unnormalized "baseline +L1", ``v`` is the raw pre-activation). A model's penalty is the
sum of these records since the last call of :func:`sparsity_penalty`::

    loss = task_loss + sparsity_penalty(model)

A layer called several times per forward (a normalized RNN cell, once per time step) adds one
term per call, so the penalty sums over time steps like the summed cross-entropy.

The records are tensors of the current step's autograd graph, kept in a
:class:`SparsityRecords` list in the layer's ``__dict__``. A copy of the layer
(``copy.deepcopy``, ``pickle``/``torch.save`` of the module, the copy that
``torch.optim.swa_utils.AveragedModel`` and EMA callbacks make) starts with no records: the
terms belong to the original's pending step, whose penalty they still add to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SPARSITY_TERMS = "sparsity_terms"


class SparsityRecords(list):
    """One layer's recorded terms (0-d tensors of the current step's graph).

    Copies and pickles as an empty list: graph tensors cannot be deep-copied, and a copy of a
    layer has no pending step of its own.
    """

    def __deepcopy__(self, memo: dict) -> SparsityRecords:
        return type(self)()

    def __reduce__(self) -> tuple[type, tuple]:
        return type(self), ()


def record_sparsity(module: nn.Module, mean_abs: Tensor, weight: float) -> None:
    """Append ``weight * mean_abs`` (a layer's ``mean|v|``) to ``module.sparsity_terms`` when
    training."""
    if weight > 0 and module.training:
        record_term(module, weight * mean_abs)


def record_term(module: nn.Module, term: Tensor) -> None:
    """Append ``term``, already ``weight * mean|v|`` (as a kernel that folds the weight in
    returns it), to ``module.sparsity_terms``."""
    terms = module.__dict__.get(SPARSITY_TERMS)
    if terms is None:
        terms = module.__dict__[SPARSITY_TERMS] = SparsityRecords()
    terms.append(term)


def sparsity_penalty(module: nn.Module, clear: bool = True) -> Tensor:
    """Sum of the sparsity terms recorded by ``module`` and its children (a 0-d tensor).

    With ``clear`` (default) the records are consumed, ready for the next training step.
    Returns ``0.`` when nothing was recorded (no layer has ``l1 > 0``, or eval mode).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    total: Tensor | None = None
    for child in module.modules():
        terms = child.__dict__.get(SPARSITY_TERMS)
        if not terms:
            continue
        for term in terms:
            total = term if total is None else total + term.to(total.device)
        if clear:
            terms.clear()
    return torch.zeros(()) if total is None else total


def records_sparsity(module: nn.Module) -> bool:
    """Whether a layer of ``module`` has recorded a sparsity term (in any forward so far): a
    model whose layers all have ``l1 = 0`` never does."""
    return any(SPARSITY_TERMS in child.__dict__ for child in module.modules())


def clear_sparsity(module: nn.Module) -> None:
    """Drop every recorded term (e.g. before a training step, after an unused forward)."""
    for child in module.modules():
        terms = child.__dict__.get(SPARSITY_TERMS)
        if terms:
            terms.clear()
