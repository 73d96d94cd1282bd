"""ClassificationTask: loss, metrics, norm switching from the CLI, and checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

from lit_divnorm.cli import main
from lit_divnorm.models.small_cnn import SmallCNN
from lit_divnorm.norm import DivisiveNorm
from lit_divnorm.tasks.classification import ClassificationTask
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning"),
]


def _cli_args(config: str, data_dir, root, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO_ROOT / "configs" / config),
        f"--data.data_dir={data_dir}",
        "--data.num_workers=0",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def _one_epoch_trainer() -> Trainer:
    return Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def test_training_loss_is_cross_entropy_plus_l1_on_raw_preactivations():
    task = ClassificationTask(arch="small_cnn", num_classes=10, norm={"name": "baseline-l1"})
    convs = [block.conv for block in task.model.features]
    outputs = []
    hooks = [conv.register_forward_hook(lambda m, i, o: outputs.append(o)) for conv in convs]
    images, labels = torch.randn(6, 3, 32, 32) * 50, torch.randint(0, 10, (6,))
    loss = task.training_step((images, labels), 0)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        task.model.eval()
        cross_entropy = F.cross_entropy(task.model(images), labels)
    expected = cross_entropy + sum(0.01 * out.abs().mean() for out in outputs[:3])
    torch.testing.assert_close(loss.detach(), expected.detach())


@pytest.mark.parametrize(("norm", "logged"), [("dn*", True), ("baseline-l1", True), ("dn", False)])
def test_train_l1_is_logged_as_the_mean_penalty_for_models_with_one(norm, logged):
    """``train/l1`` (the epoch mean of the per-step penalty) only where a layer has l1 > 0."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    task = ClassificationTask(arch="small_cnn", num_classes=10, norm=norm)
    penalties = []
    task.log_sparsity = lambda p, log=task.log_sparsity: (penalties.append(p.item()), log(p))
    trainer = _one_epoch_trainer()
    trainer.fit(task, DataLoader(data, batch_size=2))
    metrics = trainer.callback_metrics
    assert ("train/l1" in metrics) == logged
    if logged:
        assert len(penalties) == 2 and min(penalties) > 0
        assert metrics["train/l1"].item() == pytest.approx(sum(penalties) / 2, rel=1e-5)


def test_train_accuracy_of_the_epoch_is_the_micro_accuracy_over_uneven_batches():
    """Batch accuracies weighted by batch size (2, 2, 1) give the epoch's correct / total."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4])
    task = ClassificationTask(
        arch="small_cnn",
        num_classes=10,
        dropout=0.0,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    with torch.no_grad():  # make some but not all predictions right
        task.model.classifier[-1].bias.copy_(torch.tensor([3.0, 3, 0, 0, 0, 0, 0, 0, 0, 0]))
        predictions = task.model(images).argmax(1)
    expected = (predictions == labels).float().mean().item()
    assert 0 < expected < 1
    trainer = _one_epoch_trainer()
    trainer.fit(task, DataLoader(TensorDataset(images, labels), batch_size=2))
    assert trainer.callback_metrics["train/acc_epoch"].item() == pytest.approx(expected)


def test_top5_for_100_classes_and_metric_names():
    task = ClassificationTask(num_classes=100)
    assert task.top_k == (1, 5)
    assert set(task.metrics) == {f"{s}_top{k}" for s in ("val", "test") for k in (1, 5)}
    assert ClassificationTask(num_classes=10).top_k == (1,)


def test_takes_a_ready_module_and_refuses_norm_with_it():
    network = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    task = ClassificationTask(arch=network, num_classes=10)
    assert task.model is network
    loss = task.training_step((torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])), 0)
    assert loss.ndim == 0 and loss.requires_grad
    with pytest.raises(ValueError, match="norm"):
        ClassificationTask(arch=network, norm="bn")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"arch": "vgg"}, "arch"),
        ({"num_classes": 1}, "num_classes"),
        ({"arch": "small_cnn", "depth": 110}, "depth"),
        ({"arch": "resnet", "depth": 33}, "depth"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ClassificationTask(**kwargs)


def test_subclass_overrides_one_step_only():
    class LabelSmoothing(ClassificationTask):
        def _shared_step(self, batch, stage):
            images, labels = batch
            return F.cross_entropy(self(images), labels, label_smoothing=0.1)

    task = LabelSmoothing(arch=SmallCNN(norm="dn"), num_classes=10)
    assert task.training_step((torch.randn(2, 3, 32, 32), torch.tensor([1, 2])), 0).requires_grad


@pytest.mark.parametrize(
    ("norm", "field", "sigma", "l1"),
    [("dn*", "local", 0.5, 0.005), ("{name: bn, sigma: 1.0}", "batch", 1.0, 0.0)],
)
def test_model_norm_flag_switches_every_layer(tmp_path, norm, field, sigma, l1):
    data = write_cifar10(tmp_path / "data", batches=(1,), n=16)
    args = _cli_args("cifar10/ln.yaml", data, tmp_path, "--data.batch_size=8")
    cli = main(["fit", *args, "--trainer.fast_dev_run=true", "--model.norm", norm])
    norms = [b.norm for b in cli.model.model.features]
    assert all(isinstance(n, DivisiveNorm) for n in norms)
    assert all(n.sum_field.batch == (field == "batch") for n in norms)
    assert all(n.sum_field.is_local == (field == "local") for n in norms)
    if field == "local":
        assert [n.sum_field.window for n in norms] == [5, 3, 3]
    assert all(n.sigma == sigma and n.l1 == l1 for n in norms)


def test_checkpoint_test_reproduces_logged_accuracy(tmp_path):
    data = write_cifar10(tmp_path / "data", batches=(1, 2), n=100)
    args = _cli_args(
        "cifar10/bn.yaml",
        data,
        tmp_path,
        "--data.batch_size=20",
        "--data.val_size=40",
        "--trainer.max_steps=16",
        "--model.optimizer.init_args.lr=0.02",
    )
    fit = main(["fit", *args])
    logged_val = float(fit.trainer.callback_metrics["val/acc"])
    logged_test = fit.trainer.test(fit.model, datamodule=fit.datamodule)[0]["test/acc"]
    checkpoint = next(tmp_path.rglob("last.ckpt"))

    test = main(["test", *args, f"--ckpt_path={checkpoint}"])
    assert float(test.trainer.callback_metrics["test/acc"]) == pytest.approx(logged_test)
    validate = main(["validate", *args, f"--ckpt_path={checkpoint}"])
    assert float(validate.trainer.callback_metrics["val/acc"]) == pytest.approx(logged_val)

    # an independent count over the test images with the restored weights
    model = test.model.eval()
    fresh = ClassificationTask(num_classes=10, norm={"name": "bn", "sigma": 0.01}).eval()
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    correct = fresh_correct = 0
    with torch.no_grad():
        for images, labels in test.datamodule.test_dataloader():
            correct += int((model(images).argmax(1) == labels).sum())
            fresh_correct += int((fresh(images).argmax(1) == labels).sum())
    assert correct / len(test.datamodule.test_set) == pytest.approx(logged_test)
    assert correct != fresh_correct  # training changed the predictions: the check has teeth

    # the checkpoint also restores without the CLI, from its saved hyper-parameters
    restored = ClassificationTask.load_from_checkpoint(checkpoint).eval()
    for name, value in restored.state_dict().items():
        assert torch.equal(value, state[name])


def test_torchvision_arch_by_name_converts_its_norms_or_keeps_them():
    import torchvision

    task = ClassificationTask(arch="torchvision:resnet18", num_classes=100, norm="dn*")
    assert isinstance(task.model, torchvision.models.ResNet)
    assert task.model.fc.out_features == 100
    kinds = {type(m) for m in task.model.modules()}
    assert DivisiveNorm in kinds and nn.BatchNorm2d not in kinds
    assert task.hparams.arch == "torchvision:resnet18"
    loss = task.training_step((torch.randn(2, 3, 32, 32), torch.tensor([3, 99])), 0)
    assert torch.isfinite(loss)
    kept = ClassificationTask(arch="torchvision:resnet18", num_classes=10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in kept.model.modules()) == 20


def test_torchvision_arch_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"'resnet_18' is not a torchvision .*resnet18"):
        ClassificationTask(arch="torchvision:resnet_18")
    with pytest.raises(ValueError, match=r"layer_window apply to arch 'small_cnn'/'resnet' only"):
        ClassificationTask(arch="torchvision:resnet18", layer_window=[3, 3, 3])
    with pytest.raises(ValueError, match=r"arch must be one of .*'torchvision:<model name>'"):
        ClassificationTask(arch="resnet18")
