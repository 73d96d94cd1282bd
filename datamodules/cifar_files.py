"""Reading and fetching the official CIFAR python pickle files, without running their code.

The official archives hold Python 2 pickles of dicts::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
        {"data": uint8 (10000, 3072), "labels": [int] * 10000, "filenames": [...], ...}
    cifar-100-python/train, test, meta
        {"data": uint8 (N, 3072), "fine_labels": [...], "coarse_labels": [...], ...}

Each row of ``data`` is one 32x32 RGB image, channel-major (1024 red, 1024 green, 1024 blue
bytes), so ``data.reshape(N, 3, 32, 32)`` is the ``(N, C, H, W)`` image batch.

``pickle.load`` would call any function a file names; :class:`SafeUnpickler` resolves only the
plain builtin types and the functions numpy uses to rebuild an array, and refuses every other
global with :class:`UnsafePickleError`. Files are validated (shapes, dtype, label range)
instead of checked against MD5 sums, so a re-packed local copy reads as well as the original.
"""

from __future__ import annotations

import builtins
import codecs
import hashlib
import io
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SHAPE = (3, 32, 32)
_PIXELS = int(np.prod(IMAGE_SHAPE))

_reconstruct = np.array(0).__reduce__()[0]
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_BUFFER_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_SAFE_BUILTINS = frozenset(
    {"bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list"}
    | {"set", "slice", "str", "tuple"}
)


class UnsafePickleError(pickle.UnpicklingError):
    """A data file asked the unpickler for something other than plain data."""


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array rebuild, redone with :func:`numpy.frombuffer` only."""
    if order not in ("C", "F"):
        raise UnsafePickleError(f"array order must be 'C' or 'F', got {order!r}")
    array = np.frombuffer(buffer, dtype=np.dtype(dtype))
    return array.reshape(shape, order=order)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for ``bytes`` (latin-1 only)."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode is only allowed with latin-1, got {encoding!r}")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds plain data and numpy arrays, and nothing else.

    Allowed globals: builtin data types (``dict``, ``list``, ``bytes``, ...), numpy's
    ``ndarray``, ``dtype``, ``_reconstruct`` and ``_frombuffer`` (under both the numpy 1 and
    numpy 2 module names), and ``_codecs.encode`` restricted to latin-1. Any other global
    (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError` before it is
    called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in _NUMPY_MODULES and name == "_reconstruct":
            return _reconstruct
        if module in _NUMPY_BUFFER_MODULES and name == "_frombuffer":
            return _frombuffer
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: a CIFAR data file may only hold "
            "builtin data types and numpy arrays"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r} in a data file")


def load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler` (latin-1 for Python 2 strings).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafePickleError: the file names a global outside the allow-list.
        ValueError: the file is truncated or corrupt (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist")
    data = path.read_bytes()
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ValueError(
            f"CIFAR file {path} is truncated or corrupt ({len(data)} bytes; "
            f"{type(e).__name__}: {e}); replace it with a fresh copy"
        ) from e


@dataclass(frozen=True)
class CifarArrays:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def read_batch(path: str | Path, label_key: str, num_classes: int) -> CifarArrays:
    """Read one CIFAR pickle file and validate it.

    Args:
        path: the file (e.g. ``cifar-10-batches-py/data_batch_1``).
        label_key: ``"labels"`` (CIFAR-10), ``"fine_labels"`` or ``"coarse_labels"`` (CIFAR-100).
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
        :class:`CifarArrays` with images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.
    """
    path = Path(path)
    content = load_pickle(path)
    if not isinstance(content, dict):
        raise ValueError(f"CIFAR file {path} must hold a dict, got {type(content).__name__}")
    content = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}
    for key in ("data", label_key):
        if key not in content:
            raise ValueError(f"CIFAR file {path} has no {key!r} entry; keys: {sorted(content)}")
    data = content["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = getattr(data, "dtype", type(data).__name__)
        raise ValueError(f"CIFAR file {path}: 'data' must be a uint8 array, got {kind}")
    if data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ValueError(
            f"CIFAR file {path}: 'data' must have shape (N, {_PIXELS}), got {data.shape}"
        )
    labels = np.asarray(content[label_key])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"CIFAR file {path}: {label_key!r} must hold one label per image "
            f"({data.shape[0]}), got shape {labels.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CIFAR file {path}: {label_key!r} must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"CIFAR file {path}: {label_key!r} must lie in [0, {num_classes}), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    images = np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE))
    return CifarArrays(images, labels)


def read_batches(paths: Sequence[str | Path], label_key: str, num_classes: int) -> CifarArrays:
    """Read and concatenate several CIFAR files (see :func:`read_batch`)."""
    if not paths:
        raise ValueError("paths must name at least one CIFAR file, got none")
    parts = [read_batch(p, label_key, num_classes) for p in paths]
    return CifarArrays(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )


@dataclass(frozen=True)
class CifarArchive:
    """Where the official archive lives and what it unpacks to."""

    url: str
    md5: str
    folder: str


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_archive(archive: CifarArchive, data_dir: Path, timeout: float = 30.0) -> None:
    """Download the official ``.tar.gz`` into ``data_dir`` and unpack it there.

    The downloaded archive (not the unpacked files) is checked against the published MD5.
    Raises ``RuntimeError`` when the download fails (e.g. no network).
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = tempfile.TemporaryDirectory(dir=data_dir)
    except OSError as error:
        raise RuntimeError(f"cannot write the download into {data_dir}: {error}") from error
    with tmp_dir as tmp:
        target = Path(tmp) / Path(archive.url).name
        try:
            with urllib.request.urlopen(archive.url, timeout=timeout) as response:
                with target.open("wb") as handle:
                    shutil.copyfileobj(response, handle)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise RuntimeError(f"could not download {archive.url}: {error}") from error
        if md5sum(target) != archive.md5:
            raise RuntimeError(
                f"downloaded {archive.url} does not match its published MD5 {archive.md5}"
            )
        with tarfile.open(target, "r:gz") as tar:
            if not hasattr(tarfile, "data_filter"):
                raise RuntimeError(
                    "this Python lacks tarfile's safe 'data' filter (3.10.12+, 3.11.4+); "
                    f"unpack {target.name} into {data_dir} by hand"
                )
            tar.extractall(data_dir, filter="data")
