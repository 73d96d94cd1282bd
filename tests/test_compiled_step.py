"""The opt-in compiled training step (``compile``) gives the eager loss curve, per task.

Reference: the same task trained eagerly by the same Lightning trainer on the same batches from
the same initial weights; the compiled run must log the same training loss at every one of a
few dozen steps (so the forward, the sparsity penalty recorded inside the compiled graph, the
backward and the optimizer all agree) and end with the same weights. The compiled runs use
``backend="aot_eager"`` (dynamo's and AOTAutograd's full trace with fake tensors and the
functionalized graph, run by eager kernels: inductor's code generation costs 20-50 s per model
here), wrapped to count the graphs, with ``fullgraph=True`` so a graph break is an error; one
test runs the default (inductor) backend of ``compile=True`` on SRCNN, the smallest model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch._dynamo.backends.registry import lookup_backend

from datamodules.cifar import CIFAR10DataModule
from datamodules.ptb import PennTreebankDataModule
from datamodules.super_resolution import SuperResolutionDataModule
from lit_divnorm.cli import main
from lit_divnorm.models import rnn
from lit_divnorm.tasks.base import compile_options
from lit_divnorm.tasks.classification import ClassificationTask
from lit_divnorm.tasks.language_model import LanguageModelTask
from lit_divnorm.tasks.super_resolution import SuperResolutionTask
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT
from tests.ptb.conftest import random_lines, write_corpus
from tests.sr.conftest import write_rgb

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]
STEPS = 30


class CountingBackend:
    """``aot_eager`` that keeps every graph dynamo hands it."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph)
        return lookup_backend("aot_eager")(graph, example_inputs)


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _train(make_task, datamodule, compile) -> tuple[list[float], dict, object]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    task = make_task(compile)
    recorder = RecordLoss()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[recorder], gradient_clip_val=5.0,
    )  # fmt: skip
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == STEPS
    return recorder.losses, {k: v.detach().clone() for k, v in task.state_dict().items()}, task


def _assert_eager_curve(
    make_task, make_datamodule, rtol=1e-4, atol=1e-6, weight_atol=1e-5
) -> tuple[CountingBackend, list[float], dict]:
    """Train eagerly and compiled; the same loss at every step and the same final weights.
    Returns the backend and the compiled run's losses and weights."""
    eager_losses, eager_state, eager_task = _train(make_task, make_datamodule(), False)
    assert eager_task.compiled_with is None
    backend = CountingBackend()
    losses, state, task = _train(
        make_task, make_datamodule(), {"backend": backend, "fullgraph": True}
    )
    assert task.compiled_with == {"backend": backend, "fullgraph": True}
    assert backend.graphs, "the model never ran through torch.compile"
    assert len(losses) == len(eager_losses) == STEPS
    assert len(set(eager_losses)) > STEPS // 2  # the loss moves: a curve, not a constant
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(eager_losses), rtol=rtol, atol=atol
    )
    _assert_same_weights(state, eager_state, weight_atol)
    return backend, losses, state


def _assert_same_weights(state: dict, reference: dict, atol: float, rtol: float = 1e-3) -> None:
    assert state.keys() == reference.keys()  # compiled in place: the eager weights' names
    for name, value in reference.items():
        torch.testing.assert_close(
            state[name], value, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def _custom_ops(graph: torch.fx.GraphModule) -> set[str]:
    return {str(node.target) for node in graph.graph.nodes if "lit_divnorm" in str(node.target)}


def test_classification_compiled_step_gives_the_eager_loss_curve(tmp_path):
    """Small CNN with DN* (L1 penalty), augmented, device-resident batches (the fast path)."""
    root = write_cifar10(tmp_path, batches=(1,), n=40)

    def make_datamodule() -> CIFAR10DataModule:
        return CIFAR10DataModule(
            root, batch_size=8, preprocessing="resnet", seed=1, device_resident=True
        )

    def make_task(compile) -> ClassificationTask:
        return ClassificationTask(
            "small_cnn", norm={"name": "dn*", "l1": 0.01}, dropout=0.0, compile=compile,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
        )  # fmt: skip

    backend, _, _ = _assert_eager_curve(make_task, make_datamodule)
    assert len(backend.graphs) == 1  # one graph for every training step
    assert _custom_ops(backend.graphs[0])  # the norms are in it as operators


def test_language_model_compiled_step_gives_the_eager_loss_curve(tmp_path, monkeypatch):
    """LSTM with DN* cells, the state carried from window to window (the compiled model runs
    the step loop over the norm modules, the eager one its fused CPU kernels)."""
    words = [f"w{i}" for i in range(29)] + ["<unk>"]
    lines = {
        s: random_lines(k, 50, words, (3, 9)) for k, s in enumerate(("train", "valid", "test"))
    }
    folder = write_corpus(tmp_path / "ptb", lines)

    def make_datamodule() -> PennTreebankDataModule:
        return PennTreebankDataModule(str(folder), batch_size=4, bptt=4)

    def make_task(compile) -> LanguageModelTask:
        return LanguageModelTask(
            vocab_size=31, hidden_sizes=(16, 16), norm={"name": "dn*", "l1": 0.01},
            time_steps=4, compile=compile, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        )  # fmt: skip

    # the eager model runs the fused C++ LSTM kernels; they round unlike the step loop, by
    # ~1e-6 on the loss and ~1e-4 on the weights after 30 steps at lr 0.5
    backend, losses, state = _assert_eager_curve(
        make_task, make_datamodule, atol=1e-5, weight_atol=5e-4
    )
    # the first window starts from zeros, the others from the carried state: two graphs
    # (three when the epoch's last window is shorter), not one per step
    assert 2 <= len(backend.graphs) <= 3
    assert all(_custom_ops(graph) for graph in backend.graphs)
    # against the eager step loop itself, the compiled model is exact up to float32 rounding
    monkeypatch.setattr(rnn, "can_run_fused", lambda inputs: False)
    loop_losses, loop_state, _ = _train(make_task, make_datamodule(), False)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(loop_losses))
    _assert_same_weights(state, loop_state, atol=1e-6, rtol=1e-5)


@pytest.fixture
def sr_folder(tmp_path) -> Path:
    for folder, count in (("train", 3), ("eval", 1)):
        (tmp_path / folder).mkdir()
        for k in range(count):
            write_rgb(tmp_path / folder / f"{k}.png", 30, 33, seed=k + 10 * count)
    return tmp_path


def _sr_datamodule(root: Path) -> SuperResolutionDataModule:
    return SuperResolutionDataModule(
        data_dir=str(root), train_dir="train", val_dir="eval", test_dir="train",
        allow_same_val_test=True, scale=3, patch_size=21, patches_per_image=8, batch_size=4,
    )  # fmt: skip


def _sr_task(compile) -> SuperResolutionTask:
    return SuperResolutionTask(
        norm={"name": "dn*", "l1": 0.01}, init_std=0.05, compile=compile,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.003, momentum=0.9),
    )  # fmt: skip


def test_super_resolution_compiled_step_gives_the_eager_loss_curve(sr_folder):
    backend, _, _ = _assert_eager_curve(_sr_task, lambda: _sr_datamodule(sr_folder))
    assert len(backend.graphs) == 1 and _custom_ops(backend.graphs[0])


def test_compile_true_runs_inductor_with_the_eager_curve(sr_folder):
    """``compile=True`` on the CPU: inductor's generated code, no CUDA graphs."""
    eager_losses, eager_state, _ = _train(_sr_task, _sr_datamodule(sr_folder), False)
    losses, state, task = _train(_sr_task, _sr_datamodule(sr_folder), True)
    assert task.compiled_with == {} and not task.uses_cuda_graphs
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-6
    )
    _assert_same_weights(state, eager_state, atol=1e-5, rtol=1e-2)


def test_compile_options_per_device_and_bad_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_options(False, cuda) is None
    assert compile_options(True, cpu) == {}
    assert compile_options(True, cuda) == {"mode": "reduce-overhead"}  # CUDA graphs
    assert compile_options({"backend": "aot_eager"}, cuda) == {"backend": "aot_eager"}
    task = ClassificationTask()
    task._device = cuda  # what a trainer on a GPU sets; no tensor moves
    for options, replays in (
        (None, False),
        ({}, False),
        ({"mode": "reduce-overhead"}, True),
        ({"mode": "max-autotune"}, True),
        ({"mode": "max-autotune-no-cudagraphs"}, False),
        ({"backend": "cudagraphs"}, True),
        ({"options": {"triton.cudagraphs": True}}, True),
        ({"backend": "aot_eager"}, False),
    ):
        task.compiled_with = options
        assert task.uses_cuda_graphs == replays, options
    task._device = cpu
    task.compiled_with = {"mode": "reduce-overhead"}
    assert not task.uses_cuda_graphs
    with pytest.raises(ValueError, match=r"unknown torch.compile keyword\(s\) \['fulgraph'\]"):
        ClassificationTask(compile={"fulgraph": True})
    with pytest.raises(TypeError, match=r"compile must be a bool or a dict.*got 'yes'"):
        LanguageModelTask(vocab_size=10, compile="yes")


def test_cli_compiled_fast_path_config_runs_fast_dev_run(tmp_path):
    """The paper's DN* config from the command line with both switches of the fast path."""
    root = write_cifar10(tmp_path / "data", batches=(1,), n=16)
    torch._dynamo.reset()
    cli = main(
        [
            "fit", "--config", str(REPO_ROOT / "configs" / "cifar10" / "dn_star.yaml"),
            "--data.data_dir", str(root), "--data.batch_size=8", "--data.device_resident=true",
            "--model.compile={backend: aot_eager, fullgraph: true}",
            "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 1
    assert cli.model.compiled_with == {"backend": "aot_eager", "fullgraph": True}
    assert "compile" not in cli.model.hparams  # not a hyper-parameter of the checkpoint
    assert type(cli.trainer.train_dataloader).__name__ == "DeviceBatches"
