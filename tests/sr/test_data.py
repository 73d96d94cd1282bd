"""SuperResolutionDataModule on tiny fixtures and on the real Set5."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.matlab_image import imresize
from datamodules.super_resolution import SuperResolutionDataModule, read_y
from lit_divnorm.tasks.super_resolution import psnr_per_image, to_pixels

from .conftest import write_rgb


def _dirs(root) -> dict[str, str]:
    return {"data_dir": str(root), "train_dir": "train", "val_dir": "eval", "test_dir": "test"}


def _matlab_y(pixels: np.ndarray) -> np.ndarray:
    r, g, b = (pixels[..., c].astype(np.float64) for c in range(3))
    return np.floor(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255 + 0.5)


def test_rgb_png_gives_matlab_y(tmp_path):
    pixels = write_rgb(tmp_path / "x.png", 9, 7, 0)
    y = read_y(tmp_path / "x.png")
    assert y.shape == (1, 9, 7)
    np.testing.assert_array_equal(y[0].numpy(), _matlab_y(pixels))


def test_grayscale_bmp_keeps_gray_values(tmp_path):
    gray = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, "L").save(tmp_path / "g.bmp")
    np.testing.assert_array_equal(read_y(tmp_path / "g.bmp")[0].numpy(), gray)
    palette = Image.fromarray(gray, "L").convert("P")
    palette.save(tmp_path / "p.bmp")
    np.testing.assert_array_equal(read_y(tmp_path / "p.bmp")[0].numpy(), gray)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"broken\.png"):
        read_y(bad)
    write_rgb(tmp_path / "whole.png", 30, 30, 0)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.png"):
        read_y(truncated)


def test_corrupt_file_in_eval_folder_fails_setup_with_its_name(sr_folders):
    (sr_folders / "eval" / "zz_corrupt.bmp").write_bytes(b"BM" + b"\x00" * 10)
    data = SuperResolutionDataModule(**_dirs(sr_folders), scale=3)
    with pytest.raises(ValueError, match=r"zz_corrupt\.bmp"):
        data.setup("fit")


def test_sixteen_bit_images_are_refused(tmp_path):
    Image.fromarray(np.full((5, 5), 1000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png"):
        read_y(tmp_path / "deep.png")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_eval_pairs_crop_to_multiple_and_bicubic_degrade(sr_folders, scale):
    data = SuperResolutionDataModule(**_dirs(sr_folders), scale=scale)
    data.prepare_data()
    data.setup("validate")
    assert data.val_names == ["gray.bmp", "rgb.png"] and data.test_set is None
    loader = data.val_dataloader()
    batches = list(loader)
    assert len(batches) == 2
    sizes = {"gray.bmp": (36, 45), "rgb.png": (41, 38)}
    for name, (bicubic, hr) in zip(data.val_names, batches, strict=True):
        height, width = sizes[name]
        expected = (1, 1, height - height % scale, width - width % scale)
        assert bicubic.shape == hr.shape == expected
        y = read_y(sr_folders / "eval" / name)[:, : expected[2], : expected[3]] / 255
        torch.testing.assert_close(hr[0], y.float())
        down_up = imresize(imresize(y, 1 / scale), float(scale))
        torch.testing.assert_close(bicubic[0], down_up.float())


def test_training_patches_are_seeded_aligned_crops(sr_folders):
    def make(seed):
        data = SuperResolutionDataModule(
            **_dirs(sr_folders), scale=3, patches_per_image=4, batch_size=5, seed=seed
        )
        data.setup("fit")
        return data

    data = make(7)
    patches = data.train_set
    assert len(patches) == 3 * 4
    assert torch.equal(patches.positions, make(7).train_set.positions)
    assert not torch.equal(patches.positions, make(8).train_set.positions)
    for item in range(len(patches)):
        index, top, left = (int(v) for v in patches.positions[item])
        bicubic, hr = patches[item]
        assert bicubic.shape == hr.shape == (1, 33, 33)
        full_bicubic, full_hr = patches.pairs[index]
        assert torch.equal(hr, full_hr[:, top : top + 33, left : left + 33])
        assert torch.equal(bicubic, full_bicubic[:, top : top + 33, left : left + 33])
    first = [b[1] for b in make(7).train_dataloader()]
    second = [b[1] for b in make(7).train_dataloader()]
    assert len(first) == 2  # 12 patches, batch 5, last partial batch dropped
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_images_smaller_than_the_patch_are_left_out(sr_folders):
    write_rgb(sr_folders / "train" / "tiny.png", 20, 50, 9)
    data = SuperResolutionDataModule(**_dirs(sr_folders), scale=2, patches_per_image=2)
    with pytest.warns(UserWarning, match=r"tiny\.png"):
        data.setup("fit")
    assert len(data.train_set) == 3 * 2


def test_missing_known_set_names_the_folder_to_fill(tmp_path):
    (tmp_path / "T91").mkdir()
    write_rgb(tmp_path / "T91" / "a.png", 40, 40, 0)
    data = SuperResolutionDataModule(data_dir=str(tmp_path), val_dir="T91", test_dir="Set14")
    with pytest.raises(FileNotFoundError, match="Set14") as error:
        data.prepare_data()
    assert str(tmp_path / "Set14") in str(error.value)
    assert "14 high-resolution images" in str(error.value)


def test_failed_download_is_reported_with_the_folder(tmp_path):
    write_rgb(tmp_path / "a.png", 40, 40, 0)
    data = SuperResolutionDataModule(
        data_dir=str(tmp_path / "sets"),
        train_dir=str(tmp_path),
        val_dir="Set5",
        test_dir=str(tmp_path),
        download_urls={"Set5": (tmp_path / "nowhere.zip").as_uri()},
    )
    with pytest.raises(FileNotFoundError, match="download") as error:
        data.prepare_data()
    assert str(tmp_path / "sets" / "Set5") in str(error.value)


def test_download_from_an_archive_url_fills_the_folder(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    write_rgb(source / "a.png", 40, 40, 0)
    write_rgb(source / "b.png", 30, 30, 1)
    archive = tmp_path / "Set5.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in source.iterdir():
            bundle.write(path, f"Set5/HR/{path.name}")
    data = SuperResolutionDataModule(
        data_dir=str(tmp_path / "data"),
        train_dir=str(source),
        test_dir=str(source),
        download_urls={"set5": archive.as_uri()},
    )
    data.prepare_data()
    assert sorted(p.name for p in (tmp_path / "data" / "Set5").iterdir()) == ["a.png", "b.png"]


def test_validation_and_test_read_their_own_folders(sr_folders):
    data = SuperResolutionDataModule(**_dirs(sr_folders), scale=3)
    data.setup("fit")
    assert data.test_set is None  # fitting reads no test image
    data.setup("test")
    assert (data.val_names, data.test_names) == (["gray.bmp", "rgb.png"], ["t1.png", "t2.png"])
    for loader, folder, names in (
        (data.val_dataloader(), "eval", data.val_names),
        (data.test_dataloader(), "test", data.test_names),
    ):
        for (_, hr), name in zip(loader, names, strict=True):
            y = read_y(sr_folders / folder / name) / 255
            torch.testing.assert_close(hr[0], y[:, : hr.shape[2], : hr.shape[3]].float())


def test_the_same_folder_for_validation_and_test_is_refused_unless_intended(sr_folders):
    same = [
        {"val_dir": "eval", "test_dir": "eval"},
        {"val_dir": "eval", "test_dir": str(sr_folders / "eval")},  # relative and absolute
        {"val_dir": "eval", "test_dir": "./eval/"},
    ]
    (sr_folders / "eval_link").symlink_to(sr_folders / "eval")
    same.append({"val_dir": "eval", "test_dir": "eval_link"})
    for folders in same:
        message = r"val_dir 'eval' and test_dir .* same folder"
        with pytest.raises(ValueError, match=message) as error:
            SuperResolutionDataModule(data_dir=str(sr_folders), **folders)
        assert "allow_same_val_test" in str(error.value)
    data = SuperResolutionDataModule(
        data_dir=str(sr_folders), val_dir="eval", test_dir="eval", allow_same_val_test=True
    )
    data.setup("test")
    assert data.test_names == ["gray.bmp", "rgb.png"]


@pytest.mark.parametrize(
    ("argument", "value"),
    [("scale", 0), ("patch_size", -1), ("patches_per_image", 0), ("batch_size", 1.5)],
)
def test_bad_arguments_name_themselves(argument, value):
    with pytest.raises(ValueError, match=argument):
        SuperResolutionDataModule(**{argument: value})


@pytest.mark.parametrize(("scale", "published"), [(3, 30.39), (4, 28.42)])
def test_set5_bicubic_psnr_matches_published_matlab_figure(shared_data, scale, published):
    """Bicubic Set5 PSNR as the field measures it (Y, shave ``scale`` pixels, mean per image)."""
    folder = shared_data / "sr" / "Set5"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    data = SuperResolutionDataModule(data_dir=str(shared_data / "sr"), scale=scale)
    data.setup("validate")
    values = []
    for bicubic, hr in data.val_dataloader():
        shave = (..., slice(scale, -scale), slice(scale, -scale))
        values.append(psnr_per_image(to_pixels(bicubic[shave]), to_pixels(hr[shave])).item())
    assert len(values) == 5
    mean = float(np.mean(values))
    print(f"Set5 x{scale} bicubic PSNR {mean:.4f} dB (published {published})")
    assert mean == pytest.approx(published, abs=0.05)


def test_shared_t91_reads(shared_data):
    folder = shared_data / "sr" / "T91"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    paths = sorted(folder.iterdir())[:3]
    for path in paths:
        y = read_y(path)
        assert y.ndim == 3 and 16 <= y.min() and y.max() <= 235
