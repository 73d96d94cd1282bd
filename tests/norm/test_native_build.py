"""The C++ kernels' build in fresh processes: it speaks, remembers a failure under its cache
key, shares one build (or one failure) between processes, and needs no ``fcntl``.

Every process here gets one thread, an empty cache under ``tmp_path`` and, but for the one real
build (in test_native.py), a fake compiler that fails after logging what it was asked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_divnorm.norm.kernels import cpu

FAKE_ERROR = "fake-cxx: error: no such luck"
PROBE = (
    "import warnings; warnings.simplefilter('always'); "
    "from lit_divnorm.norm.kernels import cpu; print(cpu.available())"
)


def _failing_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """A ``$CXX`` that answers ``--version`` and fails every build, logging each attempt (the
    compile of ``dn_cpu.cpp``) as a line of the log."""
    log = tmp_path / "attempts.log"
    script = tmp_path / "fake-cxx"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--version*) echo "fake-cxx 1.0"; exit 0;; esac\n'
        f'case "$*" in *dn_cpu.cpp*) echo try >> {log};; esac\n'
        "sleep 0.5\n"
        f'echo "{FAKE_ERROR}" >&2\n'
        "exit 1\n"
    )
    script.chmod(0o755)
    return script, log


def _env(tmp_path: Path, compiler: Path | str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "LIT_DIVNORM_CACHE": str(tmp_path / "cache"), "CXX": str(compiler)}
    env.pop("LIT_DIVNORM_NATIVE", None)
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": _root(), **extra}


def _root() -> str:
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def _start(env: dict[str, str], script: str = PROBE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    return out.strip(), err


def test_a_failing_compiler_is_tried_once_across_three_processes(tmp_path):
    compiler, log = _failing_compiler(tmp_path)
    env = _env(tmp_path, compiler)
    results = [_finish(p) for p in [_start(env) for _ in range(3)]]
    assert [out for out, _ in results] == ["False"] * 3
    assert log.read_text().splitlines() == ["try"]  # one build attempt in all
    for _, err in results:  # each falls back with the compiler's message
        assert "C++ DN kernel could not be built" in err and FAKE_ERROR in err
    builders = [err for _, err in results if "building the C++ CPU kernels once" in err]
    assert len(builders) == 1 and "failed to build" in builders[0]
    cache = tmp_path / "cache"
    markers = list(cache.glob("dn_cpu-*.failed"))
    assert len(markers) == 1 and FAKE_ERROR in markers[0].read_text()
    assert not list(cache.glob("*.lock")) and not list(cache.glob("*.so"))

    # a later process falls back at once, with the same warning, and never runs the compiler
    start = time.monotonic()
    out, err = _finish(_start(env))
    assert out == "False" and FAKE_ERROR in err and str(markers[0]) in err
    assert "building" not in err and log.read_text().splitlines() == ["try"]
    assert time.monotonic() - start < 60

    markers[0].unlink()  # deleting the marker tries again
    assert _finish(_start(env))[0] == "False"
    assert log.read_text().splitlines() == ["try", "try"]


def test_a_waiting_process_says_so_and_shares_the_builders_failure(tmp_path):
    """A lock held by a live process on this host: the prober waits with one line, then
    takes the failure the builder remembered, without compiling."""
    compiler, log = _failing_compiler(tmp_path)
    env = _env(tmp_path, compiler, LIT_DIVNORM_BUILD_TIMEOUT="120")
    cache = tmp_path / "cache"
    cache.mkdir()
    # the key's lock, held by this (live) test process
    key = _key_in_subprocess(env)
    lock = cache / f"{key}.lock"
    lock.write_text(f"{__import__('socket').gethostname()} {os.getpid()} {time.time()}")
    err_file = tmp_path / "waiter.err"
    with err_file.open("w") as stderr:
        waiter = subprocess.Popen(
            [sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        deadline = time.monotonic() + 120
        while "waiting for" not in err_file.read_text() and time.monotonic() < deadline:
            assert waiter.poll() is None, err_file.read_text()
            time.sleep(0.1)
        (cache / f"{key}.failed").write_text(f"{FAKE_ERROR} (from the other rank)")
        lock.unlink()
        out = waiter.communicate(timeout=120)[0].strip()
    err = err_file.read_text()
    assert waiter.returncode == 0 and out == "False"
    assert f"waiting for process {os.getpid()} on " in err and str(cache) in err
    assert "(from the other rank)" in err and "building" not in err
    assert not log.exists()  # it never compiled


def test_a_stale_lock_of_a_dead_process_is_broken(tmp_path):
    compiler, log = _failing_compiler(tmp_path)
    env = _env(tmp_path, compiler, LIT_DIVNORM_BUILD_TIMEOUT="120")
    cache = tmp_path / "cache"
    cache.mkdir()
    key = _key_in_subprocess(env)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    (cache / f"{key}.lock").write_text(f"{host} {dead.pid} {time.time()}")
    start = time.monotonic()
    out, err = _finish(_start(env))
    assert out == "False" and "waiting" not in err and "building the C++ CPU kernels" in err
    assert log.read_text().splitlines() == ["try"]
    assert time.monotonic() - start < 60


def test_the_package_imports_and_falls_back_without_fcntl(tmp_path):
    compiler, log = _failing_compiler(tmp_path)
    script = (
        "import sys; sys.modules['fcntl'] = None\n"  # import fcntl raises ImportError
        "import torch, lit_divnorm, lit_divnorm.norm\n"
        "from lit_divnorm.norm import build_norm\n"
        "from lit_divnorm.norm.kernels import cpu\n"
        "y = build_norm('dn*', 4, window=3)(torch.randn(2, 4, 5, 5))\n"  # builds (and fails)
        "print(cpu.available(), tuple(y.shape), 'fcntl' in sys.modules and sys.modules['fcntl'])"
    )
    out, err = _finish(_start(_env(tmp_path, compiler), script))
    assert out == "False (2, 4, 5, 5) None" and FAKE_ERROR in err
    assert log.read_text().splitlines() == ["try"]  # the lock worked without fcntl


def _key_in_subprocess(env: dict[str, str]) -> str:
    """The cache key the probe would use (its library's stem), in the probe's environment."""
    script = (
        "from lit_divnorm.norm.kernels import cpu; print(cpu.library_path(cpu._compiler()).stem)"
    )
    return _finish(_start(env, script))[0]


@pytest.mark.parametrize("owner", ["", "garbage", "host 12 x"])
def test_an_unreadable_lock_is_not_an_owner(tmp_path, owner):
    lock = tmp_path / "x.lock"
    lock.write_text(owner)
    assert cpu._lock_owner(lock) is None
