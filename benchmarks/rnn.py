"""Training throughput of the normalized PTB language models against torch's fused RNNs.

    python benchmarks/rnn.py [--rounds 4] [--block 5] [--cells lstm tanh] [--norms none ln* dn*]

One training step is what :class:`LanguageModelTask` does per batch: forward of the batch of
``N`` streams of ``T`` tokens, the summed cross-entropy over steps averaged over streams plus
the sparsity penalty, backward, gradient clipping (global norm 5) and a plain SGD step. The
model is the paper's (PAPER.md section 2): embedding 200, two recurrent layers of 200 units,
decoder to a 10k vocabulary, batch 20, 20 steps, DN window 30 (LSTM) or 60 (RNNs). For each
cell it prints the median time of a step and the tokens per second (``N * T / time``) of
:class:`RNNLanguageModel` with each norm next to the same model built on ``torch.nn.LSTM``
(``torch.nn.RNN`` for the tanh/ReLU cells). The models take turns, ``--block`` steps each per
round, so that a drift of the machine's speed hits all alike; ``ms/step`` is the median over
all steps, ``x torch`` the median over rounds of the torch model's median step time over this
model's (throughput relative to torch's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import allocator
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_divnorm.models.rnn_lm import RNNLanguageModel
from lit_divnorm.norm.sparsity import sparsity_penalty

VOCAB, HIDDEN, LAYERS, BATCH, STEPS = 10_000, 200, 2, 20, 20


class TorchLanguageModel(nn.Module):
    """Embedding, ``torch.nn.LSTM`` / ``torch.nn.RNN`` and a linear decoder: the peer model."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        if cell == "lstm":
            self.rnn: nn.Module = nn.LSTM(HIDDEN, HIDDEN, LAYERS)
        else:
            self.rnn = nn.RNN(HIDDEN, HIDDEN, LAYERS, nonlinearity=cell)
        self.decoder = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: Tensor) -> tuple[Tensor, object]:
        hidden, state = self.rnn(self.embedding(tokens.t()))
        return self.decoder(hidden).transpose(0, 1), state


def make_step(model: nn.Module, tokens: Tensor, targets: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def step() -> None:
        logits, _state = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum")
        loss = loss / tokens.shape[0] + sparsity_penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    return step


def interleaved_ms(
    steps: dict[str, Callable[[], None]], rounds: int, block: int, warmup: int = 3
) -> dict[str, list[list[float]]]:
    """Step times in ms, ``[round][step]`` per model: in each round every model in turn runs
    ``block`` steps (after ``warmup`` steps before its first), so that a drift of the
    machine's speed hits all models alike while each block runs with warm caches."""
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for index in range(rounds):
        for name, step in steps.items():
            for _ in range(warmup if index == 0 else 1):
                step()
            block_times = []
            for _ in range(block):
                start = time.perf_counter()
                step()
                block_times.append((time.perf_counter() - start) * 1e3)
            times[name].append(block_times)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--block", type=int, default=5, help="consecutive steps per round")
    parser.add_argument("--cells", nargs="*", default=["lstm", "tanh", "relu"])
    parser.add_argument("--norms", nargs="*", default=["none", "ln*", "dn*"])
    allocator.add_flag(parser)
    args = parser.parse_args()
    allocator.apply_flag(args)
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, STEPS))
    targets = torch.randint(0, VOCAB, (BATCH, STEPS))
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, float32")
    print(
        f"PTB model: vocab {VOCAB}, {LAYERS}x{HIDDEN}, batch {BATCH}, {STEPS} steps; "
        f"median of {args.rounds} rounds x {args.block} training steps (forward, backward, "
        "clip, SGD)"
    )
    for cell in args.cells:
        peer = "torch.nn.LSTM" if cell == "lstm" else f"torch.nn.RNN({cell})"
        steps = {peer: make_step(TorchLanguageModel(cell), tokens, targets)}
        for norm in args.norms:
            model = RNNLanguageModel(VOCAB, cell=cell, hidden_sizes=[HIDDEN] * LAYERS, norm=norm)
            steps[f"{norm} ({model.layers[0].placement})"] = make_step(model, tokens, targets)
        times = interleaved_ms(steps, args.rounds, args.block)
        print(f"\ncell {cell}")
        print(f"{'model':<26}{'ms/step':>9}{'tokens/s':>10}{'x torch':>9}")
        for name, blocks in times.items():
            ms = statistics.median(t for block in blocks for t in block)
            pairs = zip(times[peer], blocks, strict=True)
            ratio = statistics.median(statistics.median(a) / statistics.median(b) for a, b in pairs)
            print(f"{name:<26}{ms:9.1f}{BATCH * STEPS / ms * 1e3:10.0f}{ratio:9.2f}")


if __name__ == "__main__":
    main()
