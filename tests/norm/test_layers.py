"""DivisiveNorm against torch's own BatchNorm / LayerNorm / InstanceNorm / GroupNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_divnorm.norm import PRESETS, DivisiveNorm, build_norm, divisive_norm, list_norms
from lit_divnorm.norm import layers as layers_module
from lit_divnorm.norm.kernels import cpu
from lit_divnorm.norm.other_norms import GeneralizedDivisiveNorm
from lit_divnorm.norm.sparsity import sparsity_penalty
from tests.norm.reference import RefField, ref_divisive_norm

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomize_affine(*modules: nn.Module) -> None:
    weight, bias = torch.rand(modules[0].weight.shape) + 0.5, torch.randn(modules[0].bias.shape)
    for module in modules:
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad, module.weight.grad, module.bias.grad


@pytest.mark.parametrize(
    "shape, torch_cls",
    [((8, 6, 5, 5), nn.BatchNorm2d), ((8, 6), nn.BatchNorm1d), ((8, 6, 7), nn.BatchNorm1d)],
)
def test_bn_equals_torch_batchnorm_in_train_and_eval(shape, torch_cls):
    ours, theirs = build_norm("bn", 6), torch_cls(6)
    _randomize_affine(ours, theirs)
    for step in range(3):  # running statistics move the same way
        x = torch.randn(shape) * (step + 1) + step
        grad = torch.randn(shape)
        for a, b in zip(_forward_backward(ours, x, grad), _forward_backward(theirs, x, grad)):
            torch.testing.assert_close(a, b, **TOL)
        ours.zero_grad()
        theirs.zero_grad()
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)
    ours.eval()
    theirs.eval()
    x, grad = torch.randn(shape), torch.randn(shape)
    for a, b in zip(_forward_backward(ours, x, grad), _forward_backward(theirs, x, grad)):
        torch.testing.assert_close(a, b, **TOL)


def _per_channel(reference, weight, bias):
    def apply(x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return reference(x) * weight.view(shape) + bias.view(shape)

    return apply


@pytest.mark.parametrize(
    "name, overrides, functional",
    [
        ("ln", {}, lambda x: F.layer_norm(x, x.shape[1:], eps=1e-5)),
        ("in", {}, lambda x: F.instance_norm(x, eps=1e-5)),
        ("gn", {"groups": 3}, lambda x: F.group_norm(x, 3, eps=1e-5)),
    ],
)
@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 6, 9)])
def test_ln_in_gn_equal_torch(name, overrides, functional, shape):
    ours = build_norm(name, 6, **overrides)
    _randomize_affine(ours)
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weight = ours.weight.detach().clone().requires_grad_(True)
    bias = ours.bias.detach().clone().requires_grad_(True)
    grad = torch.randn(shape)
    ours(x).backward(grad)
    want = _per_channel(functional, weight, bias)(x_ref)
    want.backward(grad)
    torch.testing.assert_close(ours(x).detach(), want.detach(), **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, weight.grad, **TOL)
    torch.testing.assert_close(ours.bias.grad, bias.grad, **TOL)


def test_ln_on_feature_vectors_equals_torch_layer_norm():
    ours = build_norm("ln", 10)
    x = torch.randn(3, 10)
    torch.testing.assert_close(ours(x), F.layer_norm(x, (10,), eps=1e-5), **TOL)


def _gradcheck_input(name: str) -> tuple[torch.Tensor, dict]:
    if name == "gn":
        return torch.randn(3, 4, 3, 3, dtype=torch.float64), {"groups": 2}
    return torch.randn(3, 4, 3, 3, dtype=torch.float64), {}


@pytest.mark.parametrize("name", list_norms())
def test_gradcheck_every_registry_entry(name):
    x, overrides = _gradcheck_input(name)
    module = build_norm(name, 4, layer_window=3, **overrides).double()
    if isinstance(module, GeneralizedDivisiveNorm):
        # CompressAI's init puts gamma's off-diagonal raw entries on the lower bound, a kink
        # whose gradient is by design not the derivative: check the function off the kink
        with torch.no_grad():
            module.raw_gamma.add_(0.1 * torch.rand_like(module.raw_gamma))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(module, (x,))
    names = [name for name, _ in module.named_parameters()]
    if names:

        def of_params(*values):
            return torch.func.functional_call(module, dict(zip(names, values)), (x.detach(),))

        values = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
        assert torch.autograd.gradcheck(of_params, values)


def test_learned_sigma_is_positive_and_receives_gradient():
    norm = build_norm("dn", 4, window=3, learn_sigma=True, sigma=0.5)
    assert norm.sigma.item() == pytest.approx(0.5)
    optimizer = torch.optim.SGD(norm.parameters(), lr=100.0)
    for _ in range(3):
        optimizer.zero_grad()
        norm(torch.randn(2, 4, 5, 5)).pow(2).sum().backward()
        assert norm.raw_sigma.grad is not None and norm.raw_sigma.grad != 0
        optimizer.step()
        assert norm.sigma.item() > 0


def test_window_larger_than_map_and_batch_of_one():
    x = torch.randn(1, 4, 3, 3)
    for name in ("dn", "dn*", "ln", "ln*", "in", "lrn", "dnms", "baseline-l1"):
        assert build_norm(name, 4, layer_window=11)(x).shape == x.shape
    assert build_norm("gn", 4, groups=2)(x).shape == x.shape
    # a batch field over N=1 spatial maps still has 9 values per channel
    assert build_norm("bn", 4)(x).shape == x.shape


def test_batch_field_with_one_value_per_channel_raises_in_training_only():
    norm = build_norm("bn", 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        norm(torch.randn(1, 4))
    norm.eval()
    assert norm(torch.randn(1, 4)).shape == (1, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"window": 0}, ValueError, "window"),
        ({"window": (3, -1)}, ValueError, r"window\[1\]"),
        ({"window": 2.5}, TypeError, "window"),
        ({"sigma": -1.0}, ValueError, "sigma"),
        ({"l1": -0.1}, ValueError, "l1"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"border": "zero"}, ValueError, "border"),
        ({"learn_sigma": True, "sigma": 0.0}, ValueError, "learn_sigma"),
        ({"sum_field": "nope"}, ValueError, "preset"),
    ],
)
def test_bad_layer_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        DivisiveNorm(4, **kwargs)


def test_window_on_a_norm_without_local_field_raises():
    with pytest.raises(ValueError, match="window=5"):
        build_norm("bn", 4, window=5)
    with pytest.raises(ValueError, match="groups=3 must divide num_features=4"):
        build_norm("gn", 4, groups=3)


def test_wrong_input_rank_and_num_features_mismatch_raise():
    norm = build_norm("dn", 4, window=3)
    with pytest.raises(ValueError, match="input"):
        norm(torch.randn(4))
    with pytest.raises(ValueError, match="num_features"):
        norm(torch.randn(2, 5, 3, 3))


def test_check_finite_flag():
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 2, 2] = float("nan")
    assert torch.isnan(build_norm("ln", 4)(x)).any()
    with pytest.raises(ValueError, match="NaN or inf"):
        build_norm("ln", 4, check_finite=True)(x)


def test_extra_repr_tells_the_configuration():
    text = repr(build_norm("dn*", 32, window=5, sigma=0.5, l1=0.005))
    for part in ("32", "channels=all", "window=5", "sigma=0.5", "affine=False", "l1=0.005"):
        assert part in text


def test_state_dict_round_trip_keeps_running_stats():
    a, b = build_norm("bn*", 3), build_norm("bn*", 3)
    a(torch.randn(5, 3, 4, 4) + 2)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.running_mean, a.running_mean)


def _ref_dn(x: torch.Tensor, sum_window: int, sup_window: int, sigma: float) -> torch.Tensor:
    fields = [
        RefField(channels="all", positions="window", window=(w, w))
        for w in (sum_window, sup_window)
    ]
    return torch.from_numpy(ref_divisive_norm(x.numpy(), *fields, sigma=sigma, eps=1e-5))


def _counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.skipif(not cpu.available(), reason="the C++ kernels are not built here")
def test_dn_layer_calls_the_cpu_operator_directly_and_falls_back_under_autocast(monkeypatch):
    """float32/float64 CPU maps go from the layer straight to the C++ operator; autocast (and
    every other case) takes divisive_norm's general path."""
    general = _counting(monkeypatch, layers_module, "divisive_norm")
    assert cpu.available()  # (registers the operators)
    operator = _counting(monkeypatch, torch.ops.lit_divnorm_cpu, "local_dn")
    layer = build_norm("dn", 4, window=3)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), _ref_dn(x.double(), 3, 3, 0.5).float(), **TOL)
    assert (general[0], operator[0]) == (0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert (general[0], operator[0]) == (1, 2)  # divisive_norm, which ends in the operator


def test_dn_layer_settings_changed_after_a_forward_take_effect():
    """A layer keeps its call of the C++ operator between forwards; setting sigma, a field, the
    backend or the mode afterwards still changes the output (float64 loop reference)."""
    layer = build_norm("dn", 4, window=3).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _ref_dn(x, 3, 3, 0.5))
    layer.fixed_sigma = 0.2
    torch.testing.assert_close(layer(x), _ref_dn(x, 3, 3, 0.2))
    layer.sum_field = layer.sum_field.replace(window=(5, 5))
    torch.testing.assert_close(layer(x), _ref_dn(x, 5, 3, 0.2))
    layer.backend = "torch"
    torch.testing.assert_close(layer(x), _ref_dn(x, 5, 3, 0.2))
    layer.backend = "auto"
    layer.eval()
    torch.testing.assert_close(layer(x[:1]), _ref_dn(x[:1], 5, 3, 0.2))


# ------------------------------------------------------------ a floor of zero is refused


@pytest.mark.parametrize("name", ["dn", "ln", "gn", "in", "bn", "lrn", "dn*"])
def test_sigma_zero_with_eps_zero_is_refused(name):
    kwargs = {"groups": 2} if name == "gn" else {}
    with pytest.raises(ValueError, match=r"sigma=0.0 with eps=0.0 .*allowed: sigma > 0 or eps > 0"):
        build_norm(name, 4, sigma=0.0, eps=0.0, **kwargs)
    # a positive floor either way is accepted, and finite on a constant input
    for sigma, eps in ((0.0, 1e-5), (0.5, 0.0)):
        layer = build_norm(name, 4, sigma=sigma, eps=eps, **kwargs)
        x = torch.ones(2, 4, 3, 3, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_a_learned_sigma_keeps_the_floor_positive_with_eps_zero():
    layer = build_norm("dn", 4, sigma=0.5, eps=0.0, learn_sigma=True)
    x = torch.ones(2, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.raw_sigma.grad)


def test_functional_refuses_a_zero_floor_under_a_divisor_only():
    x = torch.ones(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"sigma=0 with eps=0 .*floor sigma\^2 \+ eps = 0"):
        divisive_norm(x, PRESETS["layer"], PRESETS["layer"], sigma=0, eps=0)
    # mean subtraction only: no divisor, nothing to refuse (the output is x - mean = 0)
    torch.testing.assert_close(
        divisive_norm(x, PRESETS["layer"], None, sigma=0, eps=0), torch.zeros_like(x)
    )
    # a learned (tensor) sigma is the caller's to keep positive
    y = divisive_norm(x, PRESETS["layer"], PRESETS["layer"], sigma=torch.tensor(0.5), eps=0)
    assert torch.isfinite(y).all()


# ---------------------------------------------- backend="triton" on a CPU bn* layer: why


def test_triton_backend_on_a_cpu_bn_star_layer_says_why_it_cannot_run(monkeypatch):
    from lit_divnorm.norm.kernels import triton as triton_kernels

    monkeypatch.setattr(triton_kernels, "_INTERPRETED", False)
    layer = build_norm("bn*", 4, backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on a tensor on 'cpu'.*CUDA"):
        layer(torch.randn(2, 4, 3, 3))


def test_triton_backend_bn_star_under_the_interpreter_is_batch_norm_and_its_l1():
    from lit_divnorm.norm.kernels import triton as triton_kernels

    if not (triton_kernels.available() and triton_kernels.interpreted()):
        pytest.skip("needs Triton under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    torch.manual_seed(0)
    layer = build_norm("bn*", 4, backend="triton", sigma=0.0).train()  # (Triton: no float64)
    x = torch.randn(3, 4, 5, 5)
    y = layer(x)
    reference = nn.BatchNorm2d(4, eps=layer.eps).train()
    torch.testing.assert_close(y, reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    l1 = (x - x.mean(dim=(0, 2, 3), keepdim=True)).abs().mean() * layer.l1
    torch.testing.assert_close(sparsity_penalty(layer), l1)
