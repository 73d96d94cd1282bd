"""``RNNLanguageModel``: embedding, stacked normalized recurrent layers, decoder.

The paper's word-level PTB model (PAPER.md section 2): 2 layers of 200 units, embedding as wide
as the first layer, a linear decoder to the vocabulary, every weight uniform in ``[-0.1, 0.1]``
(the decoder bias 0, the forget bias 0, norm ``gamma = 1, beta = 0``), no dropout::

    e_t = E[w_t];  h^l_t = layer_l(h^{l-1}_t, state^l);  logits_t = W_d h^L_t + b_d

Shapes: tokens ``(N, T)`` (batch first, as the data module yields them), logits ``(N, T, V)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from lit_divnorm.models.rnn import LSTMLayer, Placement, RNNLayer
from lit_divnorm.norm.registry import NormSpec

CellType = Literal["lstm", "tanh", "relu"]
CELL_TYPES = ("lstm", "tanh", "relu")
DEFAULT_WINDOWS = {"lstm": 30, "tanh": 60, "relu": 60}


class RNNLanguageModel(nn.Module):
    """A stacked recurrent word-level language model with registry norms in its cells.

    Args:
        vocab_size: ``V``, words of the vocabulary.
        cell: ``"lstm"``, ``"tanh"`` (tanh RNN) or ``"relu"`` (ReLU RNN).
        hidden_sizes: width of each recurrent layer (the paper: ``[200, 200]``).
        norm: registry spec for every norm slot (``None``: unnormalized).
        norm_window: window of a local norm over hidden units (default 30 LSTM, 60 RNN).
        placement: where the norm sits (see :mod:`lit_divnorm.models.rnn`; ``"auto"`` follows
            the paper).
        time_steps: steps with their own batch statistics (the training ``bptt``).
        init_scale: every weight uniform in ``[-init_scale, init_scale]``.
    """

    def __init__(
        self,
        vocab_size: int,
        cell: CellType = "lstm",
        hidden_sizes: Sequence[int] = (200, 200),
        norm: NormSpec = None,
        norm_window: int | None = None,
        placement: Placement = "auto",
        time_steps: int = 20,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if cell not in CELL_TYPES:
            raise ValueError(f"cell must be one of {CELL_TYPES}, got {cell!r}")
        hidden_sizes = list(hidden_sizes)
        if not hidden_sizes:
            raise ValueError("hidden_sizes must name at least one layer width, got []")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)):
            raise TypeError(f"init_scale must be a number, got {init_scale!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.vocab_size = vocab_size
        self.cell = cell
        self.init_scale = float(init_scale)
        window = DEFAULT_WINDOWS[cell] if norm_window is None else norm_window
        self.embedding = nn.Embedding(vocab_size, hidden_sizes[0])
        widths = [hidden_sizes[0], *hidden_sizes]
        layers: list[nn.Module] = []
        for input_size, hidden_size in itertools.pairwise(widths):
            common: dict[str, Any] = dict(
                norm=norm, placement=placement, layer_window=window, time_steps=time_steps
            )
            if cell == "lstm":
                layers.append(LSTMLayer(input_size, hidden_size, **common))
            else:
                layers.append(RNNLayer(input_size, hidden_size, nonlinearity=cell, **common))
        self.layers = nn.ModuleList(layers)
        self.decoder = nn.Linear(hidden_sizes[-1], vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.init_scale
        nn.init.uniform_(self.embedding.weight, -scale, scale)
        for layer in self.layers:
            layer.reset_parameters(scale)
        nn.init.uniform_(self.decoder.weight, -scale, scale)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: Tensor, state: list[Any] | None = None) -> tuple[Tensor, list[Any]]:
        """``tokens (N, T)``, per-layer states (``None``: zeros) -> logits ``(N, T, V)``, states."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (N, T), got shape {tuple(tokens.shape)}")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state must hold {len(self.layers)} layer states, got {len(state)}")
        x = self.embedding(tokens.t())
        new_state = []
        for index, layer in enumerate(self.layers):
            x, layer_state = layer(x, None if state is None else state[index])
            new_state.append(layer_state)
        return self.decoder(x).transpose(0, 1), new_state


def detach_state(state: Any) -> Any:
    """The state with every tensor detached (truncated back-propagation through time)."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    return state


def clone_state(state: Any) -> Any:
    """The state with every tensor copied into memory of its own."""
    if isinstance(state, Tensor):
        return state.clone()
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(s) for s in state)
    return state


def state_batch_size(state: Any) -> int | None:
    """The batch size of a (nested) state, or ``None`` for no state."""
    if isinstance(state, Tensor):
        return state.shape[0]
    if isinstance(state, (list, tuple)) and state:
        return state_batch_size(state[0])
    return None


__all__ = ["RNNLanguageModel", "detach_state", "state_batch_size"]
