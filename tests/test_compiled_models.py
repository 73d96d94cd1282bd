"""torch.compile(model, fullgraph=True) of the paper's models with DN* traces through the norm
operators (no graph break) and gives the eager model's outputs, penalty and gradients."""

from __future__ import annotations

import pytest
import torch

from lit_divnorm.models.rnn_lm import RNNLanguageModel
from lit_divnorm.models.small_cnn import SmallCNN
from lit_divnorm.norm import sparsity_penalty


def _loss_and_grads(model: torch.nn.Module, run, *inputs):
    model.zero_grad()
    out = run(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    penalty = sparsity_penalty(model)
    (out.square().mean() + penalty).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), penalty.detach(), grads


def _assert_same(compiled, eager) -> None:
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-7)
    assert compiled[1] > 0  # the L1 terms were recorded inside the compiled graph
    assert compiled[2].keys() == eager[2].keys() and compiled[2]
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_compiled_small_cnn_with_dn_star_matches_eager():
    torch._dynamo.reset()
    model = SmallCNN(norm="dn*").train()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    _assert_same(_loss_and_grads(model, compiled, x), _loss_and_grads(model, model, x))


@pytest.mark.parametrize("cell", ["lstm"])
def test_compiled_language_model_with_dn_star_cells_matches_eager(cell):
    """The LM traces its step loop over the norm operators (aot_eager: the full trace of
    dynamo and AOTAutograd with fake tensors, without inductor's code generation)."""
    torch._dynamo.reset()
    model = RNNLanguageModel(40, cell, hidden_sizes=(12, 12), norm="dn*", time_steps=4).train()
    tokens = torch.randint(0, 40, (3, 4))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_loss_and_grads(model, compiled, tokens), _loss_and_grads(model, model, tokens))
