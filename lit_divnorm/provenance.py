"""Where and from which code a run ran: the machine, the thread count, the package versions
and the git commit, as records and run summaries store them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "lightning", "torchvision", "torchmetrics", "numpy", "lit-divnorm")


REPOSITORY = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str | None]:
    """``{"python": ..., package: version}`` of the packages a result depends on: the
    module's own ``__version__`` where it has one (torch's names its build, ``+cu130``),
    else the installed distribution's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name.replace("-", "_"))
            found[name] = str(getattr(module, "__version__", None) or metadata.version(name))
        except (ImportError, metadata.PackageNotFoundError):
            found[name] = None
    return found


def git_state(folder: Path = REPOSITORY) -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the repository holding ``folder``;
    ``(None, None)`` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def full_commit(short: str, folder: Path = REPOSITORY) -> str:
    """The 40-hex commit ``short`` abbreviates in this repository (``short`` if unknown)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--verify", f"{short}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return short


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else :func:`platform.processor`."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: Any) -> str:
    """``"cuda: NVIDIA H200"`` or ``"cpu: <model name>"`` for a ``torch.device``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {cpu_name()}"
    return str(device)


def environment_facts(root_device: Any) -> dict[str, Any]:
    """What a record says about the machine and code of the running process."""
    import torch

    commit, dirty = git_state()
    return {
        "device": describe_device(root_device),
        "threads": torch.get_num_threads(),
        "versions": package_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
        "python_executable": sys.executable,
        "host_cpus": os.cpu_count(),
    }
