"""Forward+backward time and training memory of every registry norm against torch's peers.

    python benchmarks/norms.py [--repeats 20] [--blocks 4] [--device cpu|cuda]
                               [--names dn dn* bn ...] [--compiled dn dn*]
                               [--precision float32 bf16-autocast]

On a GPU it adds ImageNet-like shapes (64x64x56x56 window 5, 64x256x14x14 window 3), times
with CUDA events, reports the peak memory of each step beside the saved bytes, and runs float32
and bfloat16 autocast by default; every module runs warm-up steps first, so first-call
compiles (Triton's, torch.compile's) are never timed.

For each of the paper's CIFAR shapes it prints the median time of ``forward + backward``
(timed round-robin across the norms, so load from other processes is shared fairly, in
``--blocks`` sets of freshly built modules, so no layout in memory favours one norm) and
the memory the layer keeps for backward (bytes of the tensors autograd saves, de-duplicated by
storage, the input included since every layer keeps it), each next to torch's
``BatchNorm2d``, ``GroupNorm(1, C)``, ``LocalResponseNorm(5)`` and a direct DN (channel mean,
``avg_pool2d`` box means, subtract, divide), with ratios against ``GroupNorm(1, C)`` and
against each norm's own torch counterpart (``x peer``: BatchNorm2d for the bn family,
LocalResponseNorm for lrn, InstanceNorm2d for in, RMSNorm for rmsnorm, the published formulas
in plain torch ops for frn, gdn, igdn and lcn, GroupNorm(1, C) for the rest) from the same
run; then DN with the 15x15 window against the 5x5 one, timed together.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import statistics
import time
from collections.abc import Callable

import allocator
import torch
import torch.nn.functional as F
from torch import nn

from lit_divnorm.norm import build_norm, clear_sparsity, list_norms

SHAPES = [  # (N, C, H, W, window): the paper's three CIFAR layers and a wide window
    (100, 32, 32, 32, 5),
    (100, 32, 16, 16, 3),
    (100, 64, 8, 8, 3),
    (100, 32, 32, 32, 15),
]
GPU_SHAPES = [(64, 64, 56, 56, 5), (64, 256, 14, 14, 3)]  # ImageNet-like layers
PRECISIONS = ("float32", "bf16-autocast")
WARMUP = 3
BLOCKS = 4  # fresh sets of modules per timing, see time_steps


def input_dtype(precision: str) -> torch.dtype:
    """What a norm receives in a network at ``precision``: a conv's bfloat16 output under
    autocast."""
    return torch.bfloat16 if precision == "bf16-autocast" else torch.float32


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class DirectDN(nn.Module):
    """The straightforward PyTorch DN the issue measures against (odd windows)."""

    def __init__(self, window: int, sigma: float = 0.5) -> None:
        super().__init__()
        self.window, self.sigma = window, sigma

    def box(self, t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, self.window, 1, self.window // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x - self.box(x.mean(1, keepdim=True))
        return v / torch.sqrt(self.sigma**2 + self.box((v * v).mean(1, keepdim=True)))


class ChannelRMSNorm(nn.Module):
    """torch's RMSNorm over the channels of an ``(N, C, H, W)`` map (``F.rms_norm`` on the
    channels-last view): rmsnorm's counterpart."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.movedim(1, -1), (x.shape[1],), self.weight, 1e-6)
        return y.movedim(-1, 1)


class FRNPeer(nn.Module):
    """Filter response normalization with its TLU in plain torch ops, from Singh & Krishnan
    (CVPR 2020), Listing 1: ``max(gamma x / sqrt(mean x^2 + |eps|) + beta, tau)``."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        shape = (1, channels, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.tau = nn.Parameter(torch.zeros(shape))
        self.register_buffer("eps", torch.tensor(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nu2 = x.pow(2).mean((2, 3), keepdim=True)
        y = x * torch.rsqrt(nu2 + self.eps.abs())
        return torch.maximum(self.gamma * y + self.beta, self.tau)


class GDNPeer(nn.Module):
    """CompressAI's ``GDN`` (and ``inverse=True``, IGDN): ``norm = conv2d(x^2, gamma, beta)``,
    ``x * rsqrt(norm)`` (IGDN: ``x * sqrt(norm)``), ``gamma`` and ``beta`` reparameterized
    non-negative as its NonNegativeParametrizer does (``max(p, bound)^2 - pedestal``)."""

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6) -> None:
        super().__init__()
        self.inverse = inverse
        self.pedestal = 2**-36
        self.beta_bound = (beta_min + self.pedestal) ** 0.5
        self.gamma_bound = self.pedestal**0.5
        self.raw_beta = nn.Parameter(torch.sqrt(torch.ones(channels) + self.pedestal))
        self.raw_gamma = nn.Parameter(torch.sqrt(0.1 * torch.eye(channels) + self.pedestal))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = torch.clamp_min(self.raw_beta, self.beta_bound) ** 2 - self.pedestal
        gamma = torch.clamp_min(self.raw_gamma, self.gamma_bound) ** 2 - self.pedestal
        norm = F.conv2d(x**2, gamma[:, :, None, None], beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


class LCNPeer(nn.Module):
    """Torch7's ``nn.SpatialContrastiveNormalization`` with a uniform ``window x window`` kernel
    in its convolution form: the kernel normalized over all channels, ``conv2d`` (zero padded)
    for the mean divided by the border coefficient (the kernel's mass inside the input),
    subtract, ``conv2d`` of the square, its square root divided by the coefficient, thresholded
    (``<= 1e-4`` becomes ``1e-4``), divide."""

    def __init__(self, channels: int, window: int, threshold: float = 1e-4) -> None:
        super().__init__()
        self.padding, self.threshold = window // 2, threshold
        kernel = torch.ones(1, channels, window, window) / (channels * window * window)
        self.register_buffer("kernel", kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = functools.partial(F.conv2d, weight=self.kernel.to(x.dtype), padding=self.padding)
        coef = conv(torch.ones_like(x[:1]))
        v = x - conv(x) / coef
        std = torch.sqrt(conv(v * v)) / coef
        return v / torch.where(std > self.threshold, std, self.threshold)


def saved_bytes(module: nn.Module, x: torch.Tensor, context=contextlib.nullcontext) -> int:
    """Bytes of the distinct storages autograd saves for backward (the training memory)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context():
        module(x).sum()
    clear_sparsity(module)
    return sum(storages.values())


def peak_bytes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, context) -> int:
    """The CUDA allocator's peak during one forward+backward, above what was held before."""
    if not x.is_cuda:
        return 0
    x.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with context():
        y = module(x)
    y.backward(grad.to(y.dtype))
    torch.cuda.synchronize()
    clear_sparsity(module)
    return torch.cuda.max_memory_allocated() - before


def time_steps(
    factories: dict[str, Callable[[], nn.Module]],
    x: torch.Tensor,
    repeats: int,
    context=contextlib.nullcontext,
    blocks: int = BLOCKS,
) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """Median ms of forward+backward per module, and the last set of modules built.

    The ``repeats`` rounds are split into ``blocks``; each block builds every module afresh, in
    a new random order, and warms it up. Where in memory a module's parameters and buffers land
    follows the order of creation, and that alone moved dn's and dn*'s times by up to 20%
    (whichever of the two was built first ran faster); averaging over several layouts cancels
    that. Within a block the rounds run round-robin (one step of each
    module per round, in a new random order each round) so that load from other processes, and
    the state a module leaves in the caches, fall on every module alike. CUDA steps are timed by
    events recorded around them on the stream."""
    grad = torch.randn_like(x)

    def step(module: nn.Module) -> float:
        x.grad = None
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with context():
                y = module(x)
            y.backward(grad.to(y.dtype))
            end.record()
            end.synchronize()
            clear_sparsity(module)
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        with context():
            y = module(x)
        y.backward(grad.to(y.dtype))
        clear_sparsity(module)
        return time.perf_counter() - begin

    times: dict[str, list[float]] = {name: [] for name in factories}
    order = list(factories)
    shuffle = random.Random(0).shuffle
    modules: dict[str, nn.Module] = {}
    blocks = max(1, min(blocks, repeats))
    for block in range(blocks):
        modules.clear()  # the previous set is freed before the next one is laid out
        shuffle(order)
        for name in order:
            modules[name] = factories[name]().to(x.device)
        for name in order:
            for _ in range(WARMUP):  # first-call compiles and allocations happen here
                step(modules[name])
        rounds = repeats // blocks + (block < repeats % blocks)
        for _ in range(rounds):
            shuffle(order)  # no module always runs right after the same neighbour
            for name in order:
                times[name].append(step(modules[name]))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return medians, {name: modules[name] for name in factories}


def peers(channels: int, window: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "torch BatchNorm2d": lambda: nn.BatchNorm2d(channels),
        "torch GroupNorm(1,C)": lambda: nn.GroupNorm(1, channels),
        "direct DN (avg_pool2d)": lambda: DirectDN(window),
        "torch LocalResponseNorm(5)": lambda: nn.LocalResponseNorm(5, alpha=5.0, beta=0.5),
        "torch InstanceNorm2d": lambda: nn.InstanceNorm2d(channels, affine=True),
        "torch RMSNorm (channels)": lambda: ChannelRMSNorm(channels),
        "FRN (torch ops)": lambda: FRNPeer(channels),
        "GDN (CompressAI form)": lambda: GDNPeer(channels),
        "IGDN (CompressAI form)": lambda: GDNPeer(channels, inverse=True),
        "LCN (Torch7 conv form)": lambda: LCNPeer(channels, window),
    }


def counterpart(name: str) -> str:
    """The torch layer a registry norm is held against: BatchNorm2d for the bn family,
    LocalResponseNorm (same window, exponent 1/2) for lrn, InstanceNorm2d for in, RMSNorm over
    the channels for rmsnorm, the published formulas in plain torch ops for frn (FRNPeer), gdn
    and igdn (GDNPeer, CompressAI's form) and lcn (LCNPeer, Torch7's convolution form),
    GroupNorm(1, C) for the rest."""
    if name.startswith("bn"):
        return "torch BatchNorm2d"
    if name.startswith("lrn"):
        return "torch LocalResponseNorm(5)"
    if name == "in":
        return "torch InstanceNorm2d"
    if name == "rmsnorm":
        return "torch RMSNorm (channels)"
    own = {
        "frn": "FRN (torch ops)",
        "gdn": "GDN (CompressAI form)",
        "igdn": "IGDN (CompressAI form)",
        "lcn": "LCN (Torch7 conv form)",
    }
    if name in own:
        return own[name]
    return "torch GroupNorm(1,C)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--blocks",
        type=int,
        default=BLOCKS,
        help="fresh sets of modules the repeats are split over",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--names", nargs="*", default=[n for n in list_norms() if n != "gn"])
    parser.add_argument(
        "--compiled",
        nargs="*",
        default=["dn", "dn*"],
        help='also time these with backend="compile"',
    )
    parser.add_argument(
        "--precision",
        nargs="*",
        choices=PRECISIONS,
        default=None,
        help="default: float32 on the CPU, both on a GPU",
    )
    allocator.add_flag(parser)
    args = parser.parse_args()
    allocator.apply_flag(args)
    device = torch.device(args.device)
    precisions = args.precision or (PRECISIONS if device.type == "cuda" else PRECISIONS[:1])
    shapes = SHAPES + (GPU_SHAPES if device.type == "cuda" else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, threads {torch.get_num_threads()}")
    print(f"median of {args.repeats} forward+backward; saved = bytes saved for backward", end="")
    print("; peak = allocator peak of a step above its input" if device.type == "cuda" else "")
    for precision in precisions:
        for shape in shapes:
            run_shape(shape, precision, args, device)
        names = [n for n in ("dn", "dn*") if n in args.names]
        window_cost(names, args.repeats, device, precision, args.blocks)


def run_shape(
    shape: tuple[int, ...], precision: str, args: argparse.Namespace, device: torch.device
) -> None:
    """Time every peer and norm at one ``(N, C, H, W, window)`` and print the table."""
    n, c, h, w, window = shape
    context = functools.partial(precision_context, precision, device)
    x = torch.randn(n, c, h, w, device=device, dtype=input_dtype(precision), requires_grad=True)
    factories = peers(c, window)
    peer_names = set(factories)
    for name in args.names:
        factories[name] = functools.partial(build_norm, name, c, layer_window=window)
    for name in args.compiled:
        factories[f"{name} (compiled)"] = functools.partial(
            build_norm, name, c, layer_window=window, backend="compile"
        )
    times, modules = time_steps(factories, x, args.repeats, context, args.blocks)
    grad = torch.randn_like(x)
    rows = {
        name: (times[name], saved_bytes(module, x, context), peak_bytes(module, x, grad, context))
        for name, module in modules.items()
    }
    base_ms, base_mem, base_peak = rows["torch GroupNorm(1,C)"]
    print(f"\n{precision}, shape {n}x{c}x{h}x{w}, window {window}")
    header = f"{'norm':<28}{'ms':>8}{'x GN':>7}{'x peer':>8}{'MiB saved':>11}{'x GN':>7}"
    print(header + (f"{'MiB peak':>10}{'x GN':>7}" if x.is_cuda else ""))
    for name, (ms, mem, peak) in rows.items():
        peer = counterpart(name.removesuffix(" (compiled)"))
        ratio = f"{ms / rows[peer][0]:8.2f}" if name not in peer_names else f"{'-':>8}"
        line = (
            f"{name:<28}{ms:8.2f}{ms / base_ms:7.2f}{ratio}{mem / 2**20:11.2f}"
            f"{mem / max(base_mem, 1):7.2f}"
        )
        if x.is_cuda:
            line += f"{peak / 2**20:10.2f}{peak / max(base_peak, 1):7.2f}"
        print(line)


def window_cost(
    names: list[str],
    repeats: int,
    device: torch.device,
    precision: str = "float32",
    blocks: int = BLOCKS,
) -> None:
    """The 15x15 window against the 5x5 one, timed in the same round-robin (the shapes above
    run one after the other, so a drift of the machine's speed would show as a window cost)."""
    if not names:
        return
    n, c, h, w = SHAPES[0][:4]
    x = torch.randn(n, c, h, w, device=device, dtype=input_dtype(precision), requires_grad=True)
    factories = {
        f"{name} {window}": functools.partial(build_norm, name, c, layer_window=window)
        for name in names
        for window in (5, 15)
    }
    context = functools.partial(precision_context, precision, device)
    times, _ = time_steps(factories, x, repeats, context, blocks)
    print(f"\n{precision}, window 15x15 against 5x5 at {n}x{c}x{h}x{w}, timed together")
    print(f"{'norm':<24}{'ms 5x5':>8}{'ms 15x15':>10}{'ratio':>7}")
    for name in names:
        small, large = times[f"{name} 5"], times[f"{name} 15"]
        print(f"{name:<24}{small:8.2f}{large:10.2f}{large / small:7.2f}")


if __name__ == "__main__":
    main()
