"""convert_norms against torch's own layers and the loop reference of the paper's equations.

Same kind (bn for BatchNorm, in for InstanceNorm, gn for GroupNorm, ln for LayerNorm) must
compute what the replaced torch layer computes, with its state carried over (randomized here,
so a forgotten copy fails); other norms must see the positions the tensor really has.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lit_divnorm.norm import (
    DivisiveNorm,
    Field,
    LayoutAdapter,
    NormConversion,
    convert,
    convert_norms,
    describe_norm,
    register_norm_handler,
)
from tests.norm.reference import RefField, ref_divisive_norm

TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _randomize(model: nn.Module) -> nn.Module:
    """Random affine weights and running statistics in every torch norm layer."""
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, TORCH_NORMS):
                continue
            if getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                module.bias.uniform_(-0.5, 0.5)
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def _torch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (*TORCH_NORMS, FrozenBatchNorm2d))]


# ---------------------------------------------------------------- same kind: same function


class EveryTorchNorm(nn.Module):
    """One of each torch norm on the layout it is made for."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1d_features = nn.BatchNorm1d(6)
        self.bn1d = nn.BatchNorm1d(6, momentum=0.3)
        self.bn2d = nn.BatchNorm2d(6, eps=1e-3)
        self.bn3d = nn.BatchNorm3d(6, affine=False)
        self.sync_bn = nn.SyncBatchNorm(6)
        self.no_stats_bn = nn.BatchNorm2d(6, track_running_stats=False)
        self.in1d = nn.InstanceNorm1d(6)
        self.in2d = nn.InstanceNorm2d(6, affine=True, eps=1e-3)
        self.in3d = nn.InstanceNorm3d(6)
        self.gn = nn.GroupNorm(3, 6, eps=1e-4)
        self.ln_tokens = nn.LayerNorm(6, eps=1e-6)
        self.ln_channels_last = nn.LayerNorm(6)
        self.ln_map = nn.LayerNorm((6, 4, 4), elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: (N, 6, 4, 4)
        n = x.shape[0]
        return [
            self.bn1d_features(x.mean(dim=(2, 3))),
            self.bn1d(x.flatten(2)),
            self.bn2d(x),
            self.bn3d(x.unsqueeze(2).expand(n, 6, 2, 4, 4)),
            self.sync_bn(x),
            self.no_stats_bn(x),
            self.in1d(x.flatten(2)),
            self.in2d(x),
            self.in3d(x.unsqueeze(2).expand(n, 6, 2, 4, 4) * 1.5),
            self.gn(x),
            self.ln_tokens(x.flatten(2).transpose(1, 2)),  # (N, L, C)
            self.ln_channels_last(x.permute(0, 2, 3, 1)),  # (N, H, W, C)
            self.ln_map(x),
        ]


KIND = {
    "bn": (nn.modules.batchnorm._BatchNorm,),
    "in": (nn.modules.instancenorm._InstanceNorm,),
    "gn": (nn.GroupNorm,),
    "ln": (nn.LayerNorm,),
}


@pytest.mark.parametrize("training", [False, True])
def test_same_kind_computes_what_every_torch_norm_computes(training):
    torch.manual_seed(0)
    original = _randomize(EveryTorchNorm()).double().train(training)
    converted = copy.deepcopy(original)
    for kind, types in KIND.items():
        convert_norms(converted, kind, include=list(types))
    assert not _torch_norms(converted)
    x = torch.randn(5, 6, 4, 4, dtype=torch.float64)
    for name, a, b in zip(original._modules, original(x), converted(x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)
    for name, module in original.named_children():  # the running statistics moved alike
        if getattr(module, "running_mean", None) is not None:
            new = getattr(converted, name)
            torch.testing.assert_close(new.running_mean, module.running_mean, msg=name)
            torch.testing.assert_close(new.running_var, module.running_var, msg=name)
    assert converted.gn.sum_field.groups == 3
    assert converted.sync_bn.sync_batch and not converted.bn2d.sync_batch
    assert converted.bn1d.momentum == 0.3 and converted.bn2d.eps == 1e-3
    assert converted.ln_tokens.norm.eps == 1e-6
    assert converted.bn2d.weight.dtype == torch.float64 and converted.training == training


def test_lightning_reverted_sync_batch_norm_converts_like_batch_norm():
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    plugin = TorchSyncBatchNorm()
    original = plugin.revert(plugin.apply(nn.Sequential(_randomize(nn.BatchNorm2d(4)))))
    assert type(original[0]).__name__ == "_BatchNormXd"  # what a DDP fit leaves behind
    converted = convert_norms(copy.deepcopy(original).eval(), "bn")
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(converted(x), original.eval()(x))


def test_spec_settings_win_over_the_carried_ones():
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3), nn.GroupNorm(2, 4))
    convert_norms(model, {"name": "bn", "eps": 0.1}, include=nn.BatchNorm2d, momentum=0.5)
    convert_norms(model, "gn", include="1", groups=4)
    assert (model[0].eps, model[0].momentum) == (0.1, 0.5)
    assert model[1].sum_field.groups == 4


# ------------------------------------------------------------------- layouts of other norms


def _reference_local(x: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
    """dn (sigma 0.5, eps 1e-5) by the loop reference on an (N, C, *positions) array."""
    field = RefField(channels="all", positions="window", window=window)
    return ref_divisive_norm(x, field, field, sigma=0.5, eps=1e-5)


def test_dn_in_a_layer_norm_place_windows_over_tokens_and_over_channels_last_maps():
    model = nn.ModuleDict({"tokens": nn.LayerNorm(4), "pixels": nn.LayerNorm(4)})
    convert_norms(model, "dn", window=3)
    model.double()
    tokens = torch.randn(2, 7, 4, dtype=torch.float64)  # (N, L, C)
    pixels = torch.randn(2, 3, 5, 4, dtype=torch.float64)  # (N, H, W, C)
    expected_tokens = _reference_local(tokens.numpy().transpose(0, 2, 1), (3,)).transpose(0, 2, 1)
    expected_pixels = _reference_local(pixels.numpy().transpose(0, 3, 1, 2), (3, 3))
    torch.testing.assert_close(model["tokens"](tokens).numpy(), expected_tokens)
    torch.testing.assert_close(
        model["pixels"](pixels).numpy(), expected_pixels.transpose(0, 2, 3, 1)
    )


def test_ln_in_a_layer_norm_place_is_per_token_and_ln_map_spans_everything():
    model = nn.ModuleDict({"tokens": nn.LayerNorm(4, eps=1e-3), "map": nn.LayerNorm((4, 3, 3))})
    convert_norms(model, "ln*")  # no affine, sigma 0.5, the LayerNorm's eps
    per_position = Field(channels="all", positions="self")
    assert model["tokens"].norm.sum_field == model["tokens"].norm.sup_field == per_position
    assert (
        model["map"].sum_field == model["map"].sup_field == Field(channels="all", positions="all")
    )
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    model.double()
    per_token = RefField(channels="all", positions="self")
    expected = ref_divisive_norm(x.numpy().transpose(0, 2, 1), per_token, per_token, 0.5, 1e-3)
    torch.testing.assert_close(model["tokens"](x).numpy(), expected.transpose(0, 2, 1))


def test_sequence_first_transformer_decoder_norms_see_the_sequence_as_positions():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0)  # (L, N, E)
    original = _randomize(layer).double().eval()
    same = convert_norms(copy.deepcopy(original), "ln")
    target, memory = torch.randn(5, 2, 8).double(), torch.randn(3, 2, 8).double()
    torch.testing.assert_close(same(target, memory), original(target, memory), rtol=1e-10, atol=0)
    local = convert_norms(copy.deepcopy(original), "dn")
    assert all(local.get_submodule(f"norm{i}").layout == "sequence_first" for i in (1, 2, 3))
    shapes = []
    local.norm1.norm.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    local(target, memory)
    assert shapes == [(2, 8, 5)]  # (N, C, L): the window runs over the 5 positions
    override = convert_norms(nn.Sequential(nn.LayerNorm(8)), "dn", layout="sequence_first")
    assert override[0].layout == "sequence_first"


def test_torch_transformer_encoder_layers_are_refused_with_the_reason():
    layer = nn.TransformerEncoderLayer(8, 2, batch_first=True)
    with pytest.raises(TypeError, match=r"'norm1'.*fast path"):
        convert_norms(layer, "dn*")


# -------------------------------------------------------------- torchvision models (no download)


def _vit_b_16() -> nn.Module:
    from torchvision.models import vit_b_16

    model = vit_b_16(weights=None, image_size=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head
    return model


def _builders() -> dict:
    from torchvision.models import convnext_tiny, resnet18

    return {
        "resnet18": lambda: resnet18(weights=None, num_classes=10),
        "resnet18_gn": lambda: resnet18(
            weights=None, num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c)
        ),
        "convnext_tiny": lambda: convnext_tiny(weights=None, num_classes=10),
        "vit_b_16": _vit_b_16,
    }


# layers of each model: resnet18 20 BatchNorm2d; convnext_tiny 5 LayerNorm2d + 18 LayerNorm;
# vit_b_16 2 per encoder block (12) + the final one
NORM_COUNTS = {"resnet18": 20, "resnet18_gn": 20, "convnext_tiny": 23, "vit_b_16": 25}


@pytest.fixture(scope="module")
def torchvision_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: _randomize(build()) for name, build in _builders().items()}


@pytest.mark.parametrize(
    ("name", "kind"),
    [("resnet18", "bn"), ("resnet18_gn", "gn"), ("convnext_tiny", "ln"), ("vit_b_16", "ln")],
)
def test_same_kind_conversion_keeps_the_eval_output(torchvision_models, name, kind):
    original = copy.deepcopy(torchvision_models[name]).double().eval()
    listing = convert_norms(original, kind, dry_run=True)
    assert len(listing) == NORM_COUNTS[name] == len(_torch_norms(original))
    assert all(isinstance(c, NormConversion) and c.old is original.get_submodule(c.name)
               for c in listing)  # fmt: skip
    converted = convert_norms(copy.deepcopy(original), kind)
    assert not _torch_norms(converted)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected, got = original(x), converted(x)
    assert expected.abs().max() > 1e-3  # a head that reads the features
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


# input shape a dn* layer sees, for one converted layer of each model: (N, C, *positions)
SEEN_SHAPES = {
    "resnet18": ("layer1.0.bn1", (2, 64, 8, 8)),
    "convnext_tiny": ("features.1.0.block.2.norm", (2, 96, 8, 8)),  # channels-last map
    "vit_b_16": ("encoder.layers.encoder_layer_0.ln_1.norm", (2, 768, 5)),  # 4 patches + class
}


@pytest.mark.parametrize("spec", ["dn*", "ln*", "gn"])
@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "vit_b_16"])
def test_converted_torchvision_models_train_one_step(torchvision_models, name, spec):
    model = convert_norms(copy.deepcopy(torchvision_models[name]), spec).train()
    assert not _torch_norms(model)
    layer, shape = SEEN_SHAPES[name]
    seen = []
    model.get_submodule(layer).register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = nn.functional.cross_entropy(model(images), labels)
    from lit_divnorm.norm import sparsity_penalty

    penalty = sparsity_penalty(model)
    assert (float(penalty.detach()) > 0) == (spec != "gn")
    (loss + penalty).backward()
    assert seen == [shape] and torch.isfinite(loss)
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ----------------------------------------------------------------- selection, dry run, in place


def test_include_and_exclude_by_pattern_and_type(torchvision_models):
    model = copy.deepcopy(torchvision_models["resnet18"])
    planned = convert_norms(model, "dn*", include="layer1.*", exclude=["*.bn2"], dry_run=True)
    assert [c.name for c in planned] == ["layer1.0.bn1", "layer1.1.bn1"]
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)  # a dry run changes nothing
    assert convert_norms(model, "dn*", include="layer1.*", exclude=["*.bn2"]) is model
    assert isinstance(model.layer1[0].bn1, DivisiveNorm)
    assert isinstance(model.layer1[0].bn2, nn.BatchNorm2d) and isinstance(model.bn1, nn.BatchNorm2d)
    vit = convert_norms(_vit_b_16(), "dn*", include=nn.LayerNorm, exclude="encoder.ln")
    assert isinstance(vit.encoder.ln, nn.LayerNorm)
    assert isinstance(vit.encoder.layers[3].ln_2, LayoutAdapter)


def test_a_norm_model_is_returned_converted_and_a_shared_layer_stays_shared():
    assert isinstance(convert_norms(nn.BatchNorm2d(4), "dn*"), DivisiveNorm)
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Sequential(shared))
    listing = convert_norms(model, "bn", dry_run=True)
    assert [c.name for c in listing] == ["1", "2.0"] and listing[0].new is listing[1].new
    convert_norms(model, "bn")
    assert model[1] is model[2][0] and isinstance(model[1], DivisiveNorm)


def test_a_dry_run_lists_name_old_and_new_as_text():
    (conversion,) = convert_norms(nn.Sequential(nn.LayerNorm(8)), "dn*", dry_run=True)
    name, old, new = conversion
    assert name == "0" and isinstance(old, nn.LayerNorm) and isinstance(new, LayoutAdapter)
    assert str(conversion).startswith("0: LayerNorm((8,)") and "DivisiveNorm(8" in str(conversion)


# --------------------------------------------------------- subclasses: kept behaviour or refused


class BatchNormReLU2d(nn.BatchNorm2d):
    """A norm + activation layer (as timm's BatchNormAct2d): a subclass that adds behaviour."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def test_a_norm_subclass_is_refused_unless_a_handler_says_what_it_computes(monkeypatch):
    monkeypatch.setattr(convert, "_HANDLERS", dict(convert._HANDLERS))  # undone after the test
    original = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormReLU2d(4))).eval()
    with pytest.raises(TypeError, match=r"'1' \(BatchNormReLU2d\).*subclasses BatchNorm2d"):
        convert_norms(original, "bn")
    register_norm_handler(
        BatchNormReLU2d, lambda m: dataclasses.replace(describe_norm(m), after=m.act)
    )
    with pytest.raises(ValueError, match="already has a norm handler"):
        register_norm_handler(BatchNormReLU2d, describe_norm)
    converted = convert_norms(copy.deepcopy(original), "bn")
    assert isinstance(converted[1], nn.Sequential) and isinstance(converted[1][1], nn.ReLU)
    x = torch.randn(3, 3, 5, 5)
    torch.testing.assert_close(converted(x), original(x))
    assert (original(x) == 0).any()  # the activation is really there


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (FrozenBatchNorm2d(4), r"FrozenBatchNorm2d\).*frozen"),
        (nn.LazyBatchNorm2d(), r"LazyBatchNorm2d\).*not initialized"),
    ],
)
def test_frozen_and_lazy_batch_norms_are_refused(layer, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer, nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=message):
        convert_norms(model, "dn*")
    convert_norms(model, "dn*", exclude=type(layer))
    assert model[1] is layer and isinstance(model[2], DivisiveNorm)


# ------------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 24, 1))
    model.append(nn.BatchNorm2d(24))
    with pytest.raises(ValueError, match=r"model Linear has no norm layer"):
        convert_norms(nn.Linear(2, 2), "dn*")
    with pytest.raises(ValueError, match=r"spec='dn\+'.*unknown norm 'dn\+'"):
        convert_norms(model, "dn+")
    with pytest.raises(
        ValueError, match=r"include entry 'features\.\*' matches no norm layer.*'1'"
    ):
        convert_norms(model, "dn*", include="features.*")
    with pytest.raises(ValueError, match=r"exclude entry .*GroupNorm.* matches no norm layer"):
        convert_norms(model, "dn*", exclude=nn.GroupNorm)
    with pytest.raises(ValueError, match=r"leave no norm layer"):
        convert_norms(model, "dn*", exclude="*")
    with pytest.raises(TypeError, match=r"include takes .* got 3"):
        convert_norms(model, "dn*", include=3)
    with pytest.raises(ValueError, match=r"layout must be"):
        convert_norms(model, "dn*", layout="channels_first")
    before = list(model)
    with pytest.raises(ValueError, match=r"'3' \(BatchNorm2d\(24.*groups=32 must divide .*=24"):
        convert_norms(model, "gn")  # the first layer (32 channels) would convert
    assert list(model) == before and isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize(
    ("layer", "spec", "message"),
    [
        (nn.BatchNorm2d(4, momentum=None), "bn", r"momentum=None.*pass momentum="),
        (nn.InstanceNorm2d(4, track_running_stats=True), "in", r"tracks running statistics"),
        (nn.LayerNorm((4, 3, 3)), "ln", r"elementwise affine weight of shape \(4, 3, 3\)"),
    ],
)
def test_state_a_same_kind_norm_cannot_hold_is_an_error(layer, spec, message):
    with pytest.raises(ValueError, match=r"cannot convert '0' .*" + message):
        convert_norms(nn.Sequential(layer), spec)
    assert isinstance(convert_norms(nn.Sequential(layer), "dn*")[0], DivisiveNorm)


# ------------------------------------------ same kind: no affine where the layer has none


@pytest.mark.parametrize(
    ("layer", "spec"),
    [
        (nn.BatchNorm2d(4, affine=False), "bn"),
        (nn.InstanceNorm2d(4), "in"),
        (nn.LayerNorm(4, elementwise_affine=False), "ln"),
        (nn.LayerNorm(4, bias=False), "ln"),
        (nn.GroupNorm(2, 4, affine=False), "gn"),
    ],
)
def test_same_kind_keeps_the_layers_parameters_and_buffers(layer, spec):
    model = nn.Sequential(layer)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected_params = [name for name, _ in model.named_parameters()]
    convert_norms(model, spec)
    state = {k.replace(".norm.", "."): tuple(v.shape) for k, v in model.state_dict().items()}
    assert state == expected
    assert [name.replace(".norm.", ".") for name, _ in model.named_parameters()] == expected_params


def test_the_spec_still_sets_affine_over_the_layers_lack_of_it():
    model = convert_norms(nn.Sequential(nn.BatchNorm2d(4, affine=False)), "bn", affine=True)
    assert tuple(model[0].weight.shape) == (4,) and tuple(model[0].bias.shape) == (4,)


def test_resnet18_without_batchnorm_affine_converts_to_bn_and_trains_alike():
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None)
    for name, module in list(original.named_modules()):  # every BatchNorm affine=False
        if isinstance(module, nn.BatchNorm2d):
            parent, _, attr = name.rpartition(".")
            setattr(
                original.get_submodule(parent),
                attr,
                nn.BatchNorm2d(module.num_features, affine=False),
            )
    original = original.double().train()
    converted = convert_norms(copy.deepcopy(original), "bn")
    assert not _torch_norms(converted)
    shapes = {k: tuple(v.shape) for k, v in original.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.state_dict().items()} == shapes
    assert sum(p.numel() for p in converted.parameters()) == sum(
        p.numel() for p in original.parameters()
    )
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (original, converted)]
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        target = torch.randint(0, 1000, (2,))
        outputs = []
        for model, optimizer in zip((original, converted), optimizers, strict=True):
            optimizer.zero_grad()
            out = model(x)
            nn.functional.cross_entropy(out, target).backward()
            optimizer.step()
            outputs.append(out.detach())
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-10)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(converted.eval()(x), original.eval()(x), rtol=1e-9, atol=1e-10)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-9, atol=1e-10)
