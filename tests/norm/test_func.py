"""``torch.func`` over every registry norm, in float64.

- per-sample gradients ``vmap(grad(loss))`` over ``functional_call``, for the input and every
  parameter, against a Python loop over the samples with plain autograd (which runs the C++
  kernels under ``backend="auto"``, the eager torch kernels under ``backend="torch"``);
- ``jacrev`` on a tiny input against central finite differences.

Norms with a batch field follow torch.func's documented BatchNorm semantics
(https://pytorch.org/docs/stable/func.batch_norm.html): in eval mode the running statistics
are used; in training the running statistics are dropped (``running_mean = running_var =
None``, torch's ``track_running_stats=False``) and each vmapped sample is a batch of its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from lit_divnorm.norm import build_norm, list_norms

KWARGS = {"dn": {"window": 3}, "dn*": {"window": 3}, "dnms": {"window": 3}, "gn": {"groups": 2}}
NO_BACKEND = {"frn", "gdn", "igdn", "lcn", "none"}  # (their own forward: no backend argument)
# learned floors and affine weights where the registry defaults have none
VARIANTS = {
    "dn+learned": ("dn", {"window": 3, "learn_sigma": True, "affine": True}),
    "ln*+learned": ("ln*", {"learn_sigma": True, "affine": True}),
    "lrn+learned": ("lrn", {"learn_sigma": True, "affine": True}),
    "bn*+learned": ("bn*", {"learn_sigma": True}),
    "frn+learned": ("frn", {"learn_eps": True}),
}
CASES = {**{name: (name, KWARGS.get(name, {})) for name in list_norms()}, **VARIANTS}


def _module(case: str, backend: str) -> nn.Module:
    name, kwargs = CASES[case]
    if backend != "auto":
        if name in NO_BACKEND:
            pytest.skip(f"{name} takes no backend")
        kwargs = {**kwargs, "backend": backend}
    torch.manual_seed(0)
    module = build_norm(name, 4, **kwargs).double()
    with torch.no_grad():  # parameters and running statistics away from their inits
        for p in module.parameters():
            p.add_(torch.rand_like(p) * 0.3)
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.uniform_(-0.5, 0.5)
        if getattr(module, "running_var", None) is not None:
            module.running_var.uniform_(0.5, 2.0)
    return module


def _has_batch_field(module: nn.Module) -> bool:
    fields = (getattr(module, "sum_field", None), getattr(module, "sup_field", None))
    return any(f is not None and f.batch for f in fields)


def _prepare(module: nn.Module, mode: str) -> nn.Module:
    module = copy.deepcopy(module).train(mode == "train")
    if mode == "train" and _has_batch_field(module):
        module.running_mean = None  # torch.func's BatchNorm recipe: no running statistics
        module.running_var = None
    return module


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sample_gradients_equal_a_loop_over_samples(case, backend, mode):
    module = _prepare(_module(case, backend), mode)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    weights = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v for k, v in module.named_buffers()}

    def loss(params, sample):
        y = functional_call(module, (params, buffers), (sample.unsqueeze(0),))
        return (y * weights).sum()

    grads_x, grads_p = vmap(grad(loss, argnums=(1, 0)), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):  # the loop: plain autograd through the layer itself
        sample = x[i : i + 1].clone().requires_grad_(True)
        wanted = torch.autograd.grad(
            (module(sample) * weights).sum(), [sample, *module.parameters()], allow_unused=True
        )
        torch.testing.assert_close(grads_x[i], wanted[0][0], rtol=1e-9, atol=1e-11)
        for (key, got), want in zip(grads_p.items(), wanted[1:], strict=True):
            want = torch.zeros_like(got[i]) if want is None else want
            torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-11, msg=key)
    module.__dict__.pop("sparsity_terms", None)  # (terms recorded under the transform)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jacrev_equals_finite_differences(case):
    module = _module(case, "auto")
    module = _prepare(module, "eval" if _has_batch_field(module) else "train")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v for k, v in module.named_buffers()}

    def forward(inputs):
        return functional_call(module, (params, buffers), (inputs,))

    jacobian = jacrev(forward)(x).reshape(x.numel(), x.numel())
    step = 1e-6
    with torch.no_grad():
        columns = []
        for j in range(x.numel()):
            dx = torch.zeros(x.numel(), dtype=x.dtype)
            dx[j] = step
            dx = dx.view_as(x)
            columns.append(((module(x + dx) - module(x - dx)) / (2 * step)).flatten())
    numeric = torch.stack(columns, dim=1)
    torch.testing.assert_close(jacobian, numeric, rtol=1e-5, atol=1e-6)
    module.__dict__.pop("sparsity_terms", None)


class _TouchStorage(TorchDispatchMode):
    """Reads the storage of every tensor an operator gets (as opcheck and C++ kernels do)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(arg, torch.Tensor):
                arg.untyped_storage()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["lrn", "lrn-alexnet", "dn", "dnms"])
def test_no_tensor_made_under_a_transform_outlives_it(name):
    """Box matrices are cached; one first built under jacrev would be the transform's wrapper,
    whose storage cannot be read after it (opcheck failed on such a cached matrix)."""
    kwargs = {"window": 3} if name.startswith("dn") else {}
    module = build_norm(name, 7, backend="torch", **kwargs).double()
    x = torch.randn(2, 7, 3, 5, dtype=torch.float64)  # (sizes no other test caches)
    jacrev(lambda s: module(s))(x)
    with _TouchStorage():
        y = module(x.requires_grad_(True))
        y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_a_converted_batch_norm_trains_under_vmap_by_torch_funcs_recipe():
    """convert_norms carries num_batches_tracked; with the running statistics dropped (the
    recipe) nothing is updated in place, and per-sample gradients equal a loop."""
    from lit_divnorm.norm import convert_norms

    layer = convert_norms(nn.Sequential(nn.BatchNorm2d(4).double()), "bn")[0].train()
    layer.running_mean = layer.running_var = None
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def loss(params, sample):
        return functional_call(layer, params, (sample.unsqueeze(0),)).square().mean()

    grads = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        torch_bn = nn.BatchNorm2d(4, track_running_stats=False).double()  # torch's own
        torch_bn.load_state_dict({"weight": layer.weight, "bias": layer.bias})
        torch_bn(x[i : i + 1]).square().mean().backward()
        torch.testing.assert_close(grads["weight"][i], torch_bn.weight.grad)
        torch.testing.assert_close(grads["bias"][i], torch_bn.bias.grad)
