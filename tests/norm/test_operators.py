"""The operators of :mod:`lit_divnorm.norm.ops`: ``opcheck`` on each custom op, and what runs
for a CPU tensor on the eager and the compiled path of dn, dn*, ln*, bn* and lrn, as the table
at the top of ops.py says (eager: the autograd node of the operator, or a ``TorchDispatchMode``
that sees it; compiled: the operators in the forward and backward graphs)."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from lit_divnorm.norm import build_norm, ops
from lit_divnorm.norm.kernels import cpu

BACKENDS = ["torch", *(["native"] if cpu.available() else [])]
needs_native = pytest.mark.skipif(not cpu.available(), reason="the C++ kernels are not built")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_custom_op(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    floor = torch.tensor(0.26, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    local = ([3, 3], [3, 1], None, "valid", True, backend)
    opcheck(torch.ops.lit_divnorm.local_dn.default, (x, floor, *local))
    _, stats, _ = ops.local_dn(x.detach(), floor.detach(), *local)
    one = torch.tensor(1.0, dtype=torch.float64)
    opcheck(torch.ops.lit_divnorm.local_dn_backward.default, (grad, one, x.detach(), stats, *local))
    channel = (5, "reference", 5, 1e-1, 0.75, backend)
    opcheck(torch.ops.lit_divnorm.channel_dn.default, (x, floor, *channel))
    opcheck(
        torch.ops.lit_divnorm.channel_dn_backward.default,
        (grad, x.detach(), floor.detach(), *channel),
    )


class _Seen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _layer(name: str) -> torch.nn.Module:
    return build_norm(name, 4, window=3) if name.startswith("dn") else build_norm(name, 4)


# the table's eager CPU rows: the autograd node (a C++ op's autograd is C++, invisible to a
# dispatch mode) or, for a custom op, the operator a dispatch mode sees
EAGER = {
    "dn": "CppNode<(anonymous namespace)::LocalDN>",
    "dn*": "CppNode<(anonymous namespace)::LocalDN>",
    "ln*": "CppNode<(anonymous namespace)::FieldNorm>",
    "bn*": "CppNode<(anonymous namespace)::FieldNorm>",
}


@needs_native
@pytest.mark.parametrize("name", ["dn", "dn*", "ln*", "bn*", "lrn"])
def test_the_eager_path_runs_the_tables_operator(name):
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with _Seen() as seen:
        y = _layer(name).train()(x)
        y.sum().backward()
    if name == "lrn":
        assert {"lit_divnorm.channel_dn", "lit_divnorm.channel_dn_backward"} <= seen.ops
    else:
        assert y.grad_fn.name().endswith(EAGER[name])
        assert not any(op.startswith("lit_divnorm.") for op in seen.ops)  # (no custom op)
    assert "aten.avg_pool2d" not in seen.ops and "aten.native_batch_norm" not in seen.ops


COMPILED = {  # operators the compiled forward and backward graphs must hold
    "dn": {"lit_divnorm.local_dn", "lit_divnorm.local_dn_backward"},
    "dn*": {"lit_divnorm.local_dn", "lit_divnorm.local_dn_backward"},
    "lrn": {"lit_divnorm.channel_dn", "lit_divnorm.channel_dn_backward"},
    "ln*": set(),  # plain tensor operations
    "bn*": set(),
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_the_compiled_path_runs_the_tables_operator(name):
    seen: set[str] = set()

    def record(graph, example_inputs):
        for node in graph.graph.nodes:
            if node.op == "call_function":
                seen.add(str(getattr(node.target, "overloadpacket", node.target)))
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    layer = _layer(name).train()
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    compiled(x).sum().backward()
    torch._dynamo.reset()
    ours = {op for op in seen if op.startswith(("lit_divnorm.", "lit_divnorm_cpu."))}
    assert ours == COMPILED[name]
