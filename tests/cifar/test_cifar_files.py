"""The safe CIFAR pickle reader: real format, malicious pickles, truncated and invalid files."""

from __future__ import annotations

import pickle
import pickletools

import numpy as np
import pytest

from datamodules.cifar_files import UnsafePickleError, load_pickle, read_batch, read_batches
from tests.cifar.fixtures import cifar10_batch, write_pickle


def test_reads_official_layout(tmp_path):
    content = cifar10_batch(30, seed=3)
    write_pickle(tmp_path / "data_batch_1", content)
    batch = read_batch(tmp_path / "data_batch_1", "labels", 10)
    # The official layout: each row is 1024 red, 1024 green, 1024 blue bytes, row-major.
    row = content["data"][7]
    for c in range(3):
        for y, x in ((0, 0), (5, 31), (31, 2)):
            assert batch.images[7, c, y, x] == row[c * 1024 + y * 32 + x]
    assert batch.images.shape == (30, 3, 32, 32) and batch.images.dtype == np.uint8
    assert batch.labels.tolist() == content["labels"]
    assert batch.labels.dtype == np.int64


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_python2_bytes_keys_and_other_protocols(tmp_path, protocol):
    content = cifar10_batch(10, seed=4, bytes_keys=True)
    write_pickle(tmp_path / "b", content, protocol=protocol)
    batch = read_batch(tmp_path / "b", "labels", 10)
    np.testing.assert_array_equal(batch.images.reshape(10, -1), content[b"data"])


def test_read_batches_concatenates_in_order(tmp_path):
    a, b = cifar10_batch(5, seed=1), cifar10_batch(7, seed=2)
    write_pickle(tmp_path / "a", a)
    write_pickle(tmp_path / "b", b)
    both = read_batches([tmp_path / "a", tmp_path / "b"], "labels", 10)
    assert both.labels.tolist() == a["labels"] + b["labels"]
    np.testing.assert_array_equal(
        both.images.reshape(12, -1), np.concatenate([a["data"], b["data"]])
    )


def _global_call_pickle(module: str, name: str, argument: str) -> bytes:
    """A protocol-0 pickle that calls ``module.name(argument)`` when loaded by pickle.load."""
    return f"c{module}\n{name}\n(V{argument}\ntR.".encode()


@pytest.mark.parametrize(
    ("module", "name"), [("os", "system"), ("posix", "system"), ("builtins", "eval")]
)
def test_malicious_pickle_is_refused_without_running(tmp_path, module, name):
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    payload = _global_call_pickle(module, name, command)
    assert any(op.name == "GLOBAL" for op, _, _ in pickletools.genops(payload))
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=rf"{module}\.{name}") as info:
        read_batch(path, "labels", 10)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # the same payload does run under plain pickle (the test would be void otherwise)
    if name == "system":
        pickle.loads(payload)
        assert marker.exists()


def test_malicious_object_inside_a_valid_dict_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("hello",))

    content = cifar10_batch(5, seed=1)
    content["filenames"] = Evil()
    write_pickle(tmp_path / "b", content)
    with pytest.raises(UnsafePickleError, match=r"(__builtin__|builtins)\.print"):
        load_pickle(tmp_path / "b")


def test_codecs_encode_only_for_latin1(tmp_path):
    payload = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    (tmp_path / "b").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="latin-1"):
        load_pickle(tmp_path / "b")


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.999])
def test_truncated_file_names_the_file(tmp_path, keep):
    path = tmp_path / "data_batch_3"
    write_pickle(path, cifar10_batch(50, seed=3))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        read_batch(path, "labels", 10)
    assert str(path) in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_9"):
        read_batch(tmp_path / "data_batch_9", "labels", 10)


def _edit(content, **changes):
    return {**content, **changes}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": np.zeros((10, 3000), np.uint8)}, r"shape \(N, 3072\)"),
        ({"data": np.zeros((10, 3072), np.float32)}, "uint8"),
        ({"labels": [0] * 9}, "one label per image"),
        ({"labels": [10] + [0] * 9}, r"\[0, 10\)"),
        ({"labels": [-1] + [0] * 9}, r"\[0, 10\)"),
        ({"labels": [0.5] * 10}, "integers"),
    ],
)
def test_invalid_content_is_rejected(tmp_path, change, message):
    write_pickle(tmp_path / "b", _edit(cifar10_batch(10, seed=1), **change))
    with pytest.raises(ValueError, match=message):
        read_batch(tmp_path / "b", "labels", 10)


def test_missing_entry_and_wrong_container(tmp_path):
    write_pickle(tmp_path / "b", {"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ValueError, match="no 'labels' entry"):
        read_batch(tmp_path / "b", "labels", 10)
    write_pickle(tmp_path / "c", [1, 2, 3])
    with pytest.raises(ValueError, match="must hold a dict"):
        read_batch(tmp_path / "c", "labels", 10)
