"""Safe checkpoint files: atomic writes, weights-only reads, clear errors on a wrong model.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin; ``DivNormCLI`` installs it
  by default) writes a checkpoint to a temporary file in the same folder, flushes it to disk
  and renames it over the target with ``os.replace``, so a process killed while writing
  leaves the previous checkpoint intact, never a truncated one. It reads with
  :func:`load_checkpoint_safely`.
* :func:`load_checkpoint_safely` loads with ``torch.load(..., weights_only=True)``: tensors,
  numbers, strings and plain containers only, so nothing in the file is executed. A file that
  holds anything else, or is not a checkpoint, raises ``ValueError`` saying so.
* :func:`check_compatible` compares a checkpoint's saved hyper-parameters and state-dict
  keys/shapes with a module's and raises :class:`CheckpointMismatchError` naming every
  difference (``NormalizedTask.on_load_checkpoint`` calls it before Lightning loads weights).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor

MapLocation = Callable[..., Any] | str | torch.device | None


class CheckpointMismatchError(ValueError):
    """A checkpoint was saved from a model built with a different configuration."""


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local_path(path: str | os.PathLike) -> Path:
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Writes ``.<name>.<random>.tmp`` beside ``path``, fsyncs it, then ``os.replace``s it onto
    ``path`` (atomic on POSIX within one file system). On any error the temporary file is
    removed and ``path`` keeps its previous content. Leftover temporary files of ``path``
    from a process killed mid-write (SIGKILL cannot be cleaned up after) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp creates 0600; match a plain open()
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never partial)."""
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint_safely(path: str | os.PathLike, map_location: MapLocation = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable checkpoint, or holds objects other than
            tensors and plain containers (loading those would run code from the file).
    """
    local = _local_path(path)
    if not local.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(local, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        named = [line for line in lines if "GLOBAL" in line]  # which object it tried to load
        reason = (named or lines or [type(error).__name__])[0]
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain containers "
            f"({reason}); lit-divnorm loads checkpoints weights-only and will not run code "
            "stored in a file. Re-save it from trusted code with plain state dicts."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint (truncated or "
            f"corrupt?): {reason}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not the dict that "
            "Lightning writes"
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic local writes and weights-only reads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, _local_path(path))

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: MapLocation = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_safely(path, map_location)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_compatible(
    checkpoint: Mapping[str, Any],
    hparams: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    what: str = "model",
) -> None:
    """Raise :class:`CheckpointMismatchError` if ``checkpoint`` was saved from another model.

    Compares the checkpoint's ``hyper_parameters`` with ``hparams`` (keys present in both)
    and its ``state_dict`` keys and tensor shapes with ``state_dict``; the message lists the
    differing hyper-parameters first, then missing/unexpected/reshaped weights (up to 5 each).
    """
    saved_hparams = checkpoint.get("hyper_parameters") or {}
    saved_state = checkpoint.get("state_dict")
    problems = []
    for key in sorted(set(saved_hparams) & set(hparams)):
        try:
            same = bool(saved_hparams[key] == hparams[key])
        except Exception:  # e.g. tensors compared elementwise
            same = repr(saved_hparams[key]) == repr(hparams[key])
        if not same:
            problems.append(
                f"{key}: checkpoint {_describe(saved_hparams[key])}, this run "
                f"{_describe(hparams[key])}"
            )
    if saved_state is not None:
        missing = [k for k in state_dict if k not in saved_state]
        unexpected = [k for k in saved_state if k not in state_dict]
        reshaped = [
            f"{k} {tuple(saved_state[k].shape)} vs {tuple(v.shape)}"
            for k, v in state_dict.items()
            if k in saved_state
            and isinstance(v, Tensor)
            and isinstance(saved_state[k], Tensor)
            and saved_state[k].shape != v.shape
        ]
        for label, items in (
            ("weights missing from the checkpoint", missing),
            ("weights in the checkpoint but not in this model", unexpected),
            ("weights of another shape (checkpoint vs this run)", reshaped),
        ):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint was saved from a {what} with a different configuration; "
            + "; ".join(problems)
            + ". Resume with the same config (model, norm, windows) it was trained with."
        )
