"""The C++ DN kernel: against the loop over the equations, its build cache and its fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from lit_divnorm.norm import Field, build_norm, divisive_norm
from lit_divnorm.norm.kernels import box, cpu
from lit_divnorm.norm.ops import local_divisive_norm
from tests.norm.reference import RefField, ref_divisive_norm

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler to build with")


def _local(window: tuple[int, ...]) -> tuple[Field, RefField]:
    return (
        Field(channels="all", positions="window", window=window),
        RefField(channels="all", positions="window", window=window),
    )


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize(
    ("shape", "sum_window", "sup_window"),
    [
        ((2, 3, 4, 5, 6), (3, 2, 5), (1, 4, 3)),  # three positional axes
        ((3, 4, 40), (7,), (60,)),  # a window longer than the axis
        ((2, 1, 9, 1), (3, 3), (5, 5)),  # one channel, an axis of length 1
        ((1, 5, 17, 19), (5, 5), (7, 7)),  # odd sizes, SR's unequal windows
    ],
)
def test_native_forward_matches_the_loop(shape, sum_window, sup_window, border):
    x = torch.randn(shape, dtype=torch.float64)
    sum_field, ref_sum = _local(sum_window)
    sup_field, ref_sup = _local(sup_window)
    want = ref_divisive_norm(x.numpy(), ref_sum, ref_sup, sigma=0.4, eps=0.0, border=border)
    got = divisive_norm(x, sum_field, sup_field, sigma=0.4, eps=0.0, border=border)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize(
    ("shape", "window"),
    [((2, 3, 5, 4), (3, 2)), ((3, 2, 7), (4,)), ((2, 13, 4, 3), (3, 3)), ((1, 6, 2, 160), (3, 5))],
)
def test_native_gradcheck_with_l1_and_learned_floor(shape, window, border):
    """float64 gradients of y and of the L1 term, for the input and the floor (learned sigma);
    13 channels take the backward's eight- and four-row passes and their single-row tails;
    rows of 320 doubles (longer than the kernels' kShortRow) the output passes' one-row
    loop."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    floor = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def f(x, floor):
        y, l1 = local_divisive_norm(x, window, window, floor, border, None, with_l1=True)
        return y, 3.0 * l1

    assert torch.autograd.gradcheck(f, (x, floor))


def test_float32_matches_the_pytorch_passes():
    """The C++ passes (float statistics, double box sums) against the PyTorch passes."""
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    grad = torch.randn_like(x)
    results = []
    for backend in ("native", "torch"):
        y, l1 = local_divisive_norm(x, (5, 5), (5, 5), 0.25, with_l1=True, backend=backend)
        (x_grad,) = torch.autograd.grad((y * grad).sum() + 2 * l1, x)
        results.append((y, l1, x_grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_gradient():
    """channels_last input and an expanded (stride 0) output gradient, as from y.sum()."""
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y, _ = local_divisive_norm(x, (3, 3), (3, 3), 0.25)
    y.sum().backward()
    plain = x.detach().contiguous().requires_grad_(True)
    y_plain, _ = local_divisive_norm(plain, (3, 3), (3, 3), 0.25)
    y_plain.backward(torch.ones_like(y_plain))
    torch.testing.assert_close(y, y_plain)
    torch.testing.assert_close(x.grad, plain.grad)


def test_channels_last_input_gives_a_channels_last_output():
    x = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    y, _ = local_divisive_norm(x, (3, 3), (3, 3), 0.25, backend="native")
    assert y.is_contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_sigma_zero_on_a_constant_region_is_finite():
    """A constant map has no spread: the default eps keeps ``1 / sqrt(e + floor)`` finite."""
    x = torch.full((2, 4, 6, 6), 3.0, requires_grad=True)
    norm = build_norm("dn", 4, window=3, sigma=0.0)
    y = norm(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y, torch.zeros_like(y))  # x - mean(x) = 0 everywhere
    field = Field(channels="all", positions="window", window=3)
    assert torch.isfinite(divisive_norm(x.detach(), field, field, sigma=0.0)).all()


def test_cache_key_covers_the_cpu_description_on_aarch64():
    """aarch64's cpuinfo has no x86 ``flags`` line: its ``Features`` and part numbers key the
    cache, and the per-core lines (processor, BogoMIPS) do not."""
    arm = "processor\t: {n}\nBogoMIPS\t: {mips}\nFeatures\t: fp asimd {extra}\nCPU part\t: 0xd0c\n"
    one = cpu._cpu_identity(
        arm.format(n=0, mips=50, extra="sve") + arm.format(n=1, mips=51, extra="sve")
    )
    same = cpu._cpu_identity(arm.format(n=0, mips=49, extra="sve"))
    other = cpu._cpu_identity(arm.format(n=0, mips=50, extra="sve2"))
    assert "Features : fp asimd sve" in one and "0xd0c" in one
    assert one == same and one != other


def test_two_processes_building_at_once_compile_once_and_both_load(tmp_path, monkeypatch):
    """Two fresh processes, one empty cache: the file lock lets one build while the other
    waits, then both load the same library (a compiler wrapper counts the links). The build
    leaves the library alone in the cache (written under a temporary name, then renamed), and
    a later build finds it there instead of compiling again."""
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "cxx"
    compiler = cpu._compiler()
    wrapper.write_text(
        f'#!/bin/sh\ncase "$*" in *-shared*) echo x >> {log};; esac\nexec {compiler} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "LIT_DIVNORM_CACHE": str(tmp_path / "cache"), "CXX": str(wrapper),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = (
        "from lit_divnorm.norm.kernels import cpu; print(cpu.available(), cpu._library()._name)"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    communicated = [p.communicate(timeout=300) for p in processes]
    outputs = [out.split() for out, _ in communicated]
    assert all(p.returncode == 0 for p in processes)
    assert [out[0] for out in outputs] == ["True", "True"]
    # the build speaks: one line when it starts, one when it ends (the builder's alone)
    cache = tmp_path / "cache"
    start = f"lit_divnorm: building the C++ CPU kernels once, about 30 s, into {cache}"
    builders = [err for _, err in communicated if start in err]
    assert len(builders) == 1 and "lit_divnorm: built the C++ CPU kernels in " in builders[0]
    assert outputs[0][1] == outputs[1][1]  # the same library file
    assert log.read_text().count("x") == 1
    left = [p.name for p in cache.iterdir()]  # (the lock file is gone too)
    assert left == [os.path.basename(outputs[0][1])]  # no temporary left
    monkeypatch.setenv("LIT_DIVNORM_CACHE", str(cache))
    monkeypatch.setenv("CXX", str(wrapper))
    assert str(cpu._build(cpu._compiler())) == outputs[0][1]  # cached: not built again
    assert log.read_text().count("x") == 1


def test_thread_count_does_not_change_the_result():
    x = torch.randn(5, 8, 9, 9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = local_divisive_norm(x, (3, 3), (3, 3), 0.25)
        torch.set_num_threads(2)
        two, _ = local_divisive_norm(x, (3, 3), (3, 3), 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("border", "divisor"), [("valid", None), ("reference", None), ("reference", 3)]
)
@pytest.mark.parametrize("width", [1, 4, 5, 30])
@pytest.mark.parametrize("rows", [1, 13])
def test_box_rows_equals_the_box_matrix_and_its_transpose(rows, width, border, divisor, dtype):
    """Rows in tiles of 8 (13 leaves a partial tile); a window wider than the 21 features."""
    u = torch.randn(rows, 21, dtype=dtype)
    count = 0 if border == "valid" else (divisor or width)
    matrix = box.box_matrix(21, width, border, divisor, u.device, dtype)
    spec = ((width - 1) // 2, width // 2, count)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(cpu.box_rows(u, spec), u @ matrix.T, **tolerance)
    torch.testing.assert_close(cpu.box_rows(u, spec, adjoint=True), u @ matrix, **tolerance)


def test_failed_build_leaves_its_marker_and_falls_back(tmp_path, monkeypatch):
    """A compiler that fails: only the failure's marker in the cache, one warning, and the
    PyTorch passes."""
    monkeypatch.setenv("LIT_DIVNORM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # exits 1 without writing anything
    cpu._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="C\\+\\+ DN kernel could not be built"):
            assert not cpu.available()
        assert [p.suffix for p in tmp_path.iterdir()] == [".failed"]
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        field, ref = _local((3, 3))
        want = ref_divisive_norm(x.numpy(), ref, ref, sigma=0.5, eps=0.0, border="valid")
        got = divisive_norm(x, field, field, sigma=0.5, eps=0.0)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    finally:
        cpu._library.cache_clear()


def test_switched_off_by_the_environment(monkeypatch):
    """LIT_DIVNORM_NATIVE=0: no library, no warning, the PyTorch passes."""
    monkeypatch.setenv("LIT_DIVNORM_NATIVE", "0")
    cpu._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not cpu.available()
            assert not cpu.applies(torch.zeros(2, 3, 4))
    finally:
        cpu._library.cache_clear()


WHOLE_GROUP_FIELDS = {
    "batch": (
        Field(batch=True, channels="self", positions="all"),
        RefField(batch=True, positions="all"),
    ),
    "layer": (Field(channels="all", positions="all"), RefField(channels="all", positions="all")),
    "instance": (Field(channels="self", positions="all"), RefField(positions="all")),
    "group": (
        Field(channels="groups", positions="all", groups=2),
        RefField(channels="groups", positions="all", groups=2),
    ),
}


@pytest.mark.parametrize("name", list(WHOLE_GROUP_FIELDS))
@pytest.mark.parametrize(("centre", "scale"), [(True, True), (True, False), (False, True)])
def test_whole_group_kernel_against_the_loop_with_l1_affine_and_learned_sigma(
    name, centre, scale, monkeypatch
):
    """bn*/ln*/bnms/lnms-type fields in the C++ kernel: output against the float64 loop, L1 term
    against its formula, every gradient (x, learned sigma, gamma, beta) against autograd
    through the term-by-term equations, running statistics against the direct path's."""
    calls = []
    forward = cpu.field_norm
    monkeypatch.setattr(cpu, "field_norm", lambda *a: calls.append(1) or forward(*a))
    field, ref = WHOLE_GROUP_FIELDS[name]
    sum_field, sup_field = (field if centre else None), (field if scale else None)
    ref_sum, ref_sup = (ref if centre else None), (ref if scale else None)
    x = (torch.randn(3, 4, 3, 2, dtype=torch.float64) * 2 + 5).requires_grad_()
    params = [
        torch.tensor(0.7, dtype=torch.float64, requires_grad=True),  # sigma
        (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(),  # gamma
        torch.randn(4, dtype=torch.float64, requires_grad=True),  # beta
    ]
    grad = torch.randn_like(x)
    results = []
    for fused in (True, False):
        running = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
        y, l1 = divisive_norm(
            x, sum_field, sup_field, params[0], 1e-5, weight=params[1], bias=params[2],
            running_mean=running[0] if field.batch else None,
            running_var=running[1] if field.batch else None,
            return_l1=True, fused=fused,
        )  # fmt: skip
        grads = torch.autograd.grad(
            (y * grad).sum() + 2 * l1, [x, *params], allow_unused=True, materialize_grads=True
        )
        results.append((y, l1, *grads, *(running if field.batch else ())))
    assert calls, "the C++ field kernel did not run"
    want_y = ref_divisive_norm(x.detach().numpy(), ref_sum, ref_sup, 0.7, 1e-5, "valid")
    affine = params[1].detach().view(1, -1, 1, 1).numpy(), params[2].detach().view(1, -1, 1, 1)
    want_y = want_y * affine[0] + affine[1].numpy()
    np.testing.assert_allclose(results[0][0].detach().numpy(), want_y, rtol=1e-10, atol=1e-10)
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("used", ["y", "l1"])
def test_one_output_alone_reaches_the_loss(used):
    """Only ``y`` or only the L1 term in the loss: the other output's gradient never exists,
    and the input gradient still equals autograd through the term-by-term equations."""
    x = (torch.randn(2, 5, 6, 6, dtype=torch.float64) + 3).requires_grad_()
    field = Field(channels="all", positions="window", window=3)
    got = divisive_norm(x, field, field, sigma=0.5, return_l1=True)
    want = divisive_norm(x, field, field, sigma=0.5, return_l1=True, fused=False)
    (got_grad,) = torch.autograd.grad(got[0].sum() if used == "y" else got[1], x)
    (want_grad,) = torch.autograd.grad(want[0].sum() if used == "y" else want[1], x)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "overrides"), [("dn*", {"window": 3}), ("ln*", {})])
def test_double_backward_is_refused_by_name(name, overrides):
    """The C++ backward is not differentiable: create_graph=True through it is an error that
    names the operator, not a silently wrong second derivative."""
    norm = build_norm(name, 4, **overrides).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"lit_divnorm_cpu::.*no double backward"):
        torch.autograd.grad(norm(x).square().sum(), x, create_graph=True)
