"""The CPU kernels in C++ (``dn_cpu.cpp``), built on first use, with torch operators around
the norms' kernels (``dn_torch.cpp``).

:func:`local_dn` is local DN with its backward as one torch operator whose autograd is C++
(no Python between the layer's call and the kernels, forward or backward); :func:`forward`
and :func:`backward` are its two kernels alone, computing what
:func:`lit_divnorm.norm.kernels.eager.local_forward` and its ``local_backward`` compute, for
float32/float64 CPU tensors, with two passes over the ``(N, C, *P)`` tensors each way, the
statistics and box means in between done per sample while its values are still in cache.
:func:`field_norm` does the same for fields over whole groups of units (bn, ln, in, gn types).
:func:`channel_forward` and :func:`channel_backward` (the channel-window field), :func:`centre`
(local mean subtraction), :func:`box_rows` and the fused LSTM's time steps are called through
ctypes from the same library.

The library is compiled with the system's C++ compiler (``$CXX``, else ``g++``/``c++``),
OpenMP and torch's headers into ``$LIT_DIVNORM_CACHE`` (default ``~/.cache/lit_divnorm``): the
two sources in parallel, then linked against torch's libraries. Its name hashes the
sources, the compiler and its version, the flags, torch's version and the CPU's identity
(what ``-march=native`` depends on, on every architecture): that hash is the cache key.

The build speaks, remembers and shares:

- it prints one line to stderr when it starts ("building the C++ CPU kernels once, about
  30 s, into <cache>") and one when it ends;
- it runs under a lock file (``<key>.lock``, created with ``O_CREAT | O_EXCL``: no ``fcntl``,
  so the package imports on every platform), so that processes starting together (DDP ranks)
  compile once: the others print that they wait for it, up to ``$LIT_DIVNORM_BUILD_TIMEOUT``
  seconds (default 300), then load the same library. A lock left by a process that died (its
  pid gone on this host) or older than the timeout is stale and broken;
- a failed build is remembered under its cache key (``<key>.failed`` holds the compiler's
  message), so later processes and the waiting ranks fall back at once with the same warning,
  and every rank runs the same kernels; delete the file to try again (a new compiler or torch
  makes a new key anyway);
- the library is written under a temporary name and renamed, so an interrupted build never
  leaves a broken library.

Without a compiler, :func:`available` is ``False`` (with one warning) and the kernels use their
PyTorch passes; ``LIT_DIVNORM_NATIVE=0`` turns the library off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from lit_divnorm.norm.kernels.box import Border

SOURCE = Path(__file__).with_name("dn_cpu.cpp")  # the kernels (plain C++)
BINDING = Path(__file__).with_name("dn_torch.cpp")  # their torch operators
FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",  # lets sqrt vectorize; errno is never read
    "-fno-trapping-math",  # lets the float-to-int conversion of exp_fast vectorize
    "-fopenmp",
    "-fPIC",
    "-std=c++20",  # (torch's headers need it)
)
BINDING_FLAGS = ("-O1",)  # glue code: no loop to optimize, and half the compile time
DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_I64, _INT, _DBL, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_SIGNATURES = {
    "dn_box_rows": (None, [_PTR, _PTR, _I64, _I64, _PTR, _INT, _INT]),
    "dn_centre": (None, [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _INT, _INT]),
    "dn_channel_forward": (None, [_PTR, _PTR, _I64, _I64, _I64, _PTR, _DBL, _DBL, _DBL, _INT]),
    "dn_channel_backward": (_DBL, [_PTR] * 3 + [_I64, _I64, _I64, _PTR, _DBL, _DBL, _DBL, _INT]),
    "dn_lstm_forward_step": (
        None,
        [_PTR, _I64] + [_PTR] * 7 + [_I64, _I64, _PTR, _PTR, _PTR, _DBL, _DBL, _PTR, _I64],
    ),
    "dn_lstm_backward_step": (
        None,
        [_PTR] * 11 + [_I64, _I64, _PTR, _PTR, _PTR, _DBL, _DBL, _I64],
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_DIVNORM_CACHE", Path.home() / ".cache" / "lit_divnorm"))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


# /proc/cpuinfo lines that differ between the cores of one machine, or over time
_VOLATILE_CPU_KEYS = ("processor", "cpu mhz", "bogomips", "core id", "apicid", "initial apicid")


def _cpu_identity(cpuinfo: str | None = None) -> str:
    """What ``-march=native`` depends on: the machine and its CPU description (x86's
    ``flags`` and model, aarch64's ``Features`` and part numbers, ...), every distinct line of
    ``/proc/cpuinfo`` (or of ``cpuinfo``) but the per-core and per-moment ones."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = platform.processor()
    lines = cpuinfo.splitlines()
    kept = {
        " ".join(line.split())
        for line in lines
        if line.strip() and line.split(":")[0].strip().lower() not in _VOLATILE_CPU_KEYS
    }
    return "\n".join([platform.machine(), *sorted(kept)])


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    return result.stdout


def build_timeout() -> float:
    value = os.environ.get("LIT_DIVNORM_BUILD_TIMEOUT", "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"LIT_DIVNORM_BUILD_TIMEOUT must be a positive number of seconds, got {value!r}"
        )
    return seconds


def say(message: str) -> None:
    """One line of the build's progress on stderr (every rank prints its own)."""
    print(f"lit_divnorm: {message}", file=sys.stderr, flush=True)


def _lock_owner(lock: Path) -> tuple[str, int, float] | None:
    """``(host, pid, created)`` written in ``lock``, or ``None`` when unreadable."""
    try:
        host, pid, created = lock.read_text().split()
        return host, int(pid), float(created)
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (on Windows, where ``os.kill`` would end it,
    assumed: a lock there goes stale by age only)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # (someone else's process, or a platform that cannot tell: alive)
    return True


def _stale(lock: Path, timeout: float) -> bool:
    """Whether ``lock`` was left by a process that died on this host, or is older than
    ``timeout`` seconds (a build on another host of a shared cache that never finished)."""
    owner = _lock_owner(lock)
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False  # (gone: not stale, just free)
    if owner is None:
        return age > min(timeout, 10.0)  # (written right after creation: a crash in between)
    host, pid, _ = owner
    return (host == socket.gethostname() and not _pid_alive(pid)) or age > timeout


@contextlib.contextmanager
def _build_lock(lock: Path, timeout: float, cache: Path) -> Iterator[None]:
    """Hold the lock file ``lock`` (``O_CREAT | O_EXCL``), waiting up to ``timeout`` seconds
    for another process's build (with one line saying so); a stale lock is removed."""
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _stale(lock, timeout):
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                continue
            if not told:
                owner = _lock_owner(lock)
                who = f"process {owner[1]} on {owner[0]}" if owner else "another process"
                say(
                    f"waiting for {who} to build the C++ CPU kernels into {cache} "
                    f"(up to {timeout:.0f} s)"
                )
                told = True
            if time.monotonic() > deadline:
                raise OSError(
                    f"timed out after {timeout:.0f} s waiting for another process to build the "
                    f"C++ kernels in {cache} (lock {lock}; raise $LIT_DIVNORM_BUILD_TIMEOUT, or "
                    "delete the lock if no build runs); this process uses the PyTorch passes"
                ) from None
            time.sleep(0.05)
    try:
        os.write(descriptor, f"{socket.gethostname()} {os.getpid()} {time.time()}".encode())
        os.close(descriptor)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)


class BuildFailed(OSError):
    """The build of this cache key failed (now or in an earlier process)."""


def failure_marker(target: Path) -> Path:
    """The file that remembers a failed build of the library ``target``."""
    return target.with_suffix(".failed")


def _torch_flags() -> tuple[list[str], list[str]]:
    """The compile flags (torch's headers, its C++ ABI) and link flags (its libraries, found
    again at load through the rpath) of the torch operators."""
    lib = str(Path(torch.__file__).parent / "lib")
    include = Path(torch.__file__).parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_flags = [f"-I{include}", f"-I{include / 'torch/csrc/api/include'}"]
    compile_flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
    return compile_flags, [f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def library_path(compiler: str) -> Path:
    """Where the library for these sources, compiler, flags, torch and CPU lives in the
    cache."""
    parts = [SOURCE.read_text(), BINDING.read_text(), compiler, _compiler_version(compiler)]
    compile_flags, link_flags = _torch_flags()
    parts += [*FLAGS, *BINDING_FLAGS, *compile_flags, *link_flags, torch.__version__]
    key = hashlib.sha256("\0".join([*parts, _cpu_identity()]).encode()).hexdigest()[:16]
    return cache_dir() / f"dn_cpu-{key}.so"


def _run(commands: list[list[str]], timeout: float) -> None:
    """Run ``commands`` side by side; the first failure raises ``CalledProcessError`` (with
    its output), and a run past ``timeout`` seconds ``TimeoutExpired``."""
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    deadline = time.monotonic() + timeout
    try:
        for command, process in zip(commands, processes, strict=True):
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            if process.returncode:
                raise subprocess.CalledProcessError(process.returncode, command, output, output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()  # (reaps it and closes its pipe)


def _build(compiler: str) -> Path:
    """The library for ``compiler``: from the cache, or built once under the lock (raises
    :class:`BuildFailed`, also for a failure remembered in the cache)."""
    target = library_path(compiler)
    if target.exists():
        return target
    marker = failure_marker(target)
    if marker.exists():
        raise BuildFailed(f"{marker.read_text()} [remembered in {marker}; delete it to retry]")
    target.parent.mkdir(parents=True, exist_ok=True)
    timeout = build_timeout()
    with _build_lock(target.with_suffix(".lock"), timeout, target.parent):
        if target.exists():  # another process built it while this one waited
            return target
        if marker.exists():  # ... or failed to
            raise BuildFailed(f"{marker.read_text()} [remembered in {marker}; delete it to retry]")
        say(f"building the C++ CPU kernels once, about 30 s, into {target.parent}")
        start = time.monotonic()
        try:
            _compile(compiler, target, timeout)
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            detail = str(getattr(error, "stderr", None) or error)[-2000:]  # (a compiler's tail)
            if not isinstance(error, subprocess.TimeoutExpired):  # (a slow machine may retry)
                with contextlib.suppress(OSError):  # (a cache it cannot write: not remembered)
                    marker.write_text(detail)
            say(f"the C++ CPU kernels failed to build after {time.monotonic() - start:.0f} s")
            raise BuildFailed(detail) from error
        say(f"built the C++ CPU kernels in {time.monotonic() - start:.0f} s: {target}")
    return target


def _compile(compiler: str, target: Path, timeout: float) -> None:
    compile_flags, link_flags = _torch_flags()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dn_cpu-") as work:
        objects = [str(Path(work) / "kernels.o"), str(Path(work) / "binding.o")]
        _run(
            [
                [compiler, *FLAGS, "-c", str(SOURCE), "-o", objects[0]],
                [compiler, *FLAGS, *BINDING_FLAGS, *compile_flags, "-c", str(BINDING),
                 "-o", objects[1]],
            ],
            timeout,
        )  # fmt: skip
        partial = str(Path(work) / "library.so")
        _run([[compiler, "-shared", "-fopenmp", *objects, *link_flags, "-o", partial]], timeout)
        os.replace(partial, target)  # complete, or not there at all


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LIT_DIVNORM_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    try:
        if compiler is None:
            raise OSError("no C++ compiler found (set $CXX, or install g++)")
        library = ctypes.CDLL(str(_build(compiler)))
        if not library.dn_register_ops():  # (not at load: registering never throws there)
            raise OSError("torch refused to register the lit_divnorm_cpu operators")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = str(getattr(error, "stderr", None) or error)[-2000:]  # (a compiler's tail)
        warnings.warn(
            f"lit_divnorm: the C++ DN kernel could not be built ({detail}); using the slower "
            "PyTorch passes",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        for suffix in DTYPES.values():
            function = getattr(library, f"{name}_{suffix}")
            function.restype, function.argtypes = restype, argtypes
    return library


def available() -> bool:
    """Whether the C++ kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def applies(x: Tensor) -> bool:
    """Whether the C++ kernel handles ``x``: a float32/float64 CPU tensor, library built."""
    return x.is_cpu and x.dtype in DTYPES and available()


@functools.lru_cache(maxsize=256)
def window_specs(
    sum_windows: tuple[int, ...],
    sup_windows: tuple[int, ...],
    border: Border,
    sup_divisors: tuple[int, ...] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The kernels' ``sum_spec, sup_spec``: per axis ``(before, after, divisor)``, divisor 0
    standing for the count of positions inside (``"valid"``)."""
    divisors = sup_divisors or sup_windows

    def spec(widths: tuple[int, ...], divs: tuple[int, ...]) -> tuple[int, ...]:
        values: list[int] = []
        for width, divisor in zip(widths, divs, strict=True):
            values += [(width - 1) // 2, width // 2, divisor if border == "reference" else 0]
        return tuple(values)

    return spec(sum_windows, sum_windows), spec(sup_windows, divisors)


def local_dn(
    x: Tensor,
    floor: float | Tensor,
    sum_windows: tuple[int, ...],
    sup_windows: tuple[int, ...],
    border: Border,
    sup_divisors: tuple[int, ...] | None,
    with_l1: bool,
    l1_weight: float = 1.0,
) -> list[Tensor]:
    """``[y]``, or ``[y, l1_weight * mean|x - m|]`` with ``with_l1``, for ``x`` ``(N, C, *P)``
    float32 or float64: the operator ``lit_divnorm_cpu::local_dn``, whose autograd (the
    kernels' backward, and ``dL/dfloor`` for a learned ``floor`` tensor) runs in C++. A layer
    passes its ``l1`` as ``l1_weight`` and records the second output as it is."""
    specs = window_specs(sum_windows, sup_windows, border, sup_divisors)
    learned, value = (floor, 0.0) if isinstance(floor, Tensor) else (None, floor)
    return torch.ops.lit_divnorm_cpu.local_dn(x, learned, value, *specs, with_l1, l1_weight)


def forward(
    x: Tensor,
    floor: float,
    sum_windows: tuple[int, ...],
    sup_windows: tuple[int, ...],
    border: Border,
    sup_divisors: tuple[int, ...] | None,
    with_l1: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, stats, mean|x - m|)`` for ``x`` of shape ``(N, C, *P)`` (the mean is ``0.``
    unless ``with_l1``): ``stats`` ``(3, N, 1, *P)`` stacks the ``q1, m, r`` of
    :mod:`lit_divnorm.norm.kernels.eager` (one tensor: one allocation, one saved tensor)."""
    specs = window_specs(sum_windows, sup_windows, border, sup_divisors)
    return torch.ops.lit_divnorm_cpu.local_dn_forward(x, floor, *specs, with_l1)


def backward(
    grad_y: Tensor,
    x: Tensor,
    stats: Tensor,
    sum_windows: tuple[int, ...],
    sup_windows: tuple[int, ...],
    border: Border,
    sup_divisors: tuple[int, ...] | None,
    l1_coef: float | None,
) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dfloor)`` from ``dL/dy`` and, unless ``l1_coef`` is ``None``, the L1
    term ``l1_coef * sum|x - m|``; ``stats`` is that of :func:`forward`."""
    specs = window_specs(sum_windows, sup_windows, border, sup_divisors)
    coef, with_l1 = (0.0, False) if l1_coef is None else (l1_coef, True)
    return torch.ops.lit_divnorm_cpu.local_dn_backward(grad_y, x, stats, *specs, coef, with_l1)


@functools.lru_cache(maxsize=256)
def _geometry(
    dims: tuple[int, ...],
    sum_windows: tuple[int, ...],
    border: Border,
) -> tuple[object, ...]:
    """``ndim, dims, sum`` for the ctypes call of :func:`centre` (cached)."""
    sum_spec, _ = window_specs(sum_windows, sum_windows, border, None)
    return len(dims), (_I64 * len(dims))(*dims), (_I64 * len(sum_spec))(*sum_spec)


def _function(name: str, x: Tensor) -> Callable[..., float]:
    return _typed_function(name, x.dtype)


@functools.cache
def _typed_function(name: str, dtype: torch.dtype) -> Callable[..., float]:
    return getattr(_library(), f"{name}_{DTYPES[dtype]}")


def centre(
    x: Tensor, sum_windows: tuple[int, ...], border: Border, adjoint: bool = False
) -> Tensor:
    """``x - A(mean_c x)`` for ``x`` ``(N, C, *P)`` (local mean subtraction, dnms); with
    ``adjoint`` its backward, ``g - A^T(mean_c g)`` for ``x = g``."""
    layout = _memory_format(x)
    x = x.contiguous()
    y = torch.empty_like(x)
    ndim, dims, sums = _geometry(tuple(x.shape[2:]), sum_windows, border)
    _function("dn_centre", x)(
        x.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        x.shape[1],
        ndim,
        dims,
        sums,
        int(adjoint),
        torch.get_num_threads(),
    )
    return y.contiguous(memory_format=layout)


def _memory_format(x: Tensor) -> torch.memory_format:
    """``channels_last`` for such a 4-D input (the kernels' output keeps its layout)."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def field_norm(
    x: Tensor,
    floor: float | Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    groups: int,
    centre: bool,
    scale: bool,
    with_l1: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """A field over whole groups of units of ``x`` ``(N, C, *P)`` float32 or float64: each
    channel over the batch (``groups=0``) or ``groups`` groups of channels of each sample
    (layer: 1, instance: C)::

        mu = mean_F x (centre, else 0),  var = mean_F (x - mu)^2,
        r = 1 / sqrt(var + floor) (scale, else 1),  y = w (x - mu) r + b

    Returns ``(y, mean|x - mu|, stats)``: ``stats`` ``(3, G)`` stacks ``mu, var, r`` per group
    (``G = C`` for the batch, else ``N * groups``); the mean is ``0.`` unless ``with_l1``. The
    operator ``lit_divnorm_cpu::field_norm``, its autograd (x, a learned ``floor`` tensor,
    ``w``, ``b``) in C++."""
    learned, value = (floor, 0.0) if isinstance(floor, Tensor) else (None, floor)
    return torch.ops.lit_divnorm_cpu.field_norm(
        x, learned, value, weight, bias, groups, centre, scale, with_l1
    )


def channel_forward(
    x: Tensor, window: tuple[int, int, int], floor: float, alpha: float, power: float
) -> Tensor:
    """``y = x (floor + alpha B_c(x^2))^(-power)`` for ``x`` ``(N, C, *P)``, ``B_c`` the box
    mean over channels ``c - before .. c + after`` of ``window = (before, after, divisor)``
    (divisor 0: the channels inside)."""
    layout = _memory_format(x)
    x = x.contiguous()
    y = torch.empty_like(x)
    _function("dn_channel_forward", x)(
        x.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        x.shape[1],
        math.prod(x.shape[2:]),
        _window_spec(window),
        floor,
        alpha,
        power,
        torch.get_num_threads(),
    )
    return y.contiguous(memory_format=layout)


def channel_backward(
    grad_y: Tensor,
    x: Tensor,
    window: tuple[int, int, int],
    floor: float,
    alpha: float,
    power: float,
) -> tuple[Tensor, float]:
    """``(dL/dx, dL/dfloor)`` of :func:`channel_forward` from ``dL/dy``."""
    layout = _memory_format(x)
    grad_y, x = grad_y.contiguous(), x.contiguous()
    grad_x = torch.empty_like(x)
    grad_floor = _function("dn_channel_backward", x)(
        grad_y.data_ptr(),
        x.data_ptr(),
        grad_x.data_ptr(),
        x.shape[0],
        x.shape[1],
        math.prod(x.shape[2:]),
        _window_spec(window),
        floor,
        alpha,
        power,
        torch.get_num_threads(),
    )
    return grad_x.contiguous(memory_format=layout), grad_floor


@functools.lru_cache(maxsize=64)
def _window_spec(window: tuple[int, int, int]) -> ctypes.Array:
    return (_I64 * 3)(*window)


def box_rows(u: Tensor, window: tuple[int, int, int], adjoint: bool = False) -> Tensor:
    """Box means along the last axis of ``u`` ``(..., L)``: ``window = (before, after,
    divisor)`` covers ``j - before .. j + after``, divided by ``divisor`` or, when it is 0, by
    the positions inside; ``adjoint`` applies the transpose. The same as ``u @ M.T``
    (``u @ M``) for ``M`` of :func:`lit_divnorm.norm.box.box_matrix`, in O(u.numel())."""
    u = u.contiguous()
    out = torch.empty_like(u)
    rows = u.numel() // u.shape[-1] if u.numel() else 0
    _function("dn_box_rows", u)(
        u.data_ptr(),
        out.data_ptr(),
        rows,
        u.shape[-1],
        _window_spec(window),
        int(adjoint),
        torch.get_num_threads(),
    )
    return out


RowSpec = tuple[int, int, int, int]


@functools.lru_cache(maxsize=64)
def _row_spec(spec: RowSpec) -> ctypes.Array:
    return (_I64 * 4)(*spec)


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def lstm_forward_steps(
    buffers: dict[str, Tensor | None],
    specs: tuple[RowSpec, RowSpec, RowSpec],
    floors: tuple[float, float],
    l1_sums: ctypes.Array,
) -> Callable[[int], None]:
    """``step(t)``: time step ``t`` of :class:`lit_divnorm.models.fused_rnn.FusedLSTM` for
    every sample, after the product that fills the gates' pre-activations ``v``.

    ``buffers`` are contiguous, laid out in time: ``v`` (``(T, N, 4H)``, or one ``(N, 4H)``
    block reused by every step), ``gate_r (T, 4N, H)``, ``acts (T, N, 4H)``, ``cells`` and
    ``hs`` (``(T + 1, N, H)``, step ``t`` reads entry ``t`` and writes ``t + 1``), ``cell_v``,
    ``cell_r`` and ``tanh_n`` (``(T, N, H)``); an ``r`` has width 1 instead of ``H`` for a
    layer mean, and ``gate_r``, ``cell_v``, ``cell_r`` are ``None`` where not needed.
    ``specs`` are the gate suppression, cell summation and cell suppression fields as
    ``(mode, before, after, divisor)`` (mode 0 none, 1 a layer mean, 2 a window; divisor 0
    counts the features inside); ``floors`` the gate and cell ``sigma^2 + eps``. Each step adds
    ``sum|v|`` and ``sum|cell_v|`` to the two doubles of ``l1_sums``.
    """
    v, cells = buffers["v"], buffers["cells"]
    batch, hidden = cells.shape[1], cells.shape[2]
    step_stride = batch * 4 * hidden if v.ndim == 3 else 0
    names = ("gate_r", "acts", "cells", "cell_v", "cell_r", "tanh_n", "hs")
    return functools.partial(
        _function("dn_lstm_forward_step", v),
        v.data_ptr(),
        step_stride,
        *(_pointer(buffers[name]) for name in names),
        batch,
        hidden,
        *(_row_spec(spec) for spec in specs),
        *floors,
        l1_sums,
    )


def lstm_backward_steps(
    grads: dict[str, Tensor | None],
    saved: dict[str, Tensor | None],
    specs: tuple[RowSpec, RowSpec, RowSpec],
    l1_coefs: tuple[float, float],
) -> Callable[[int], None]:
    """``step(t)``: the backward of step ``t`` of :func:`lstm_forward_steps`. Writes
    ``dL/dv_t`` into ``grads["grad_v"][t]`` (``(T, N, 4H)``) and turns ``grads["grad_c"]``
    (``dL/dc_t``, ``(N, H)``) into ``dL/dc_{t-1}`` in place; ``grads["grad_h"]`` (``(N, H)``)
    plus ``grads["grad_out"][t]`` (``(T, N, H)`` or ``None``) is ``dL/dh_t``. ``saved`` holds
    the forward's buffers ``acts``, ``cells``, ``tanh_n``, ``gate_v`` (its ``v``), ``gate_r``,
    ``cell_v``, ``cell_r``; ``l1_coefs`` the gate and cell L1 terms' ``dL/d(sum|v|)`` (0:
    none)."""
    grad_c = grads["grad_c"]
    names = ("acts", "cells", "tanh_n", "gate_v", "gate_r", "cell_v", "cell_r")
    return functools.partial(
        _function("dn_lstm_backward_step", grad_c),
        grads["grad_h"].data_ptr(),
        _pointer(grads["grad_out"]),
        grad_c.data_ptr(),
        *(_pointer(saved[name]) for name in names),
        grads["grad_v"].data_ptr(),
        grad_c.shape[0],
        grad_c.shape[1],
        *(_row_spec(spec) for spec in specs),
        *l1_coefs,
    )
