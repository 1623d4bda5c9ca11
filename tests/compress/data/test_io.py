"""File formats: PFM, images, KITTI/FSD disparity PNGs, calib.txt, atomic writes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from compress.data.io import (
    atomic_write,
    decode_fsd_disparity,
    encode_fsd_disparity,
    read_calib,
    read_fsd_disparity,
    read_image,
    read_kitti_disparity,
    read_mask,
    read_pfm,
    write_calib,
    write_disparity_png,
    write_fsd_disparity,
    write_kitti_disparity,
    write_pfm,
)
from compress.errors import DataError


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------- PFM


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_pfm_round_trip(tmp_path, little_endian, shape):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=shape).astype(np.float32) * 100
    arr.flat[0] = np.inf  # Middlebury marks unknown disparity with inf
    path = tmp_path / "x.pfm"
    write_pfm(path, arr, little_endian=little_endian)
    back = read_pfm(path)
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, arr)
    header = path.read_bytes().split(b"\n")
    assert header[0] == (b"PF" if len(shape) == 3 else b"Pf")
    assert header[1] == f"{shape[1]} {shape[0]}".encode()
    assert float(header[2]) == (-1.0 if little_endian else 1.0)
    assert _leftovers(tmp_path) == []


def test_pfm_reads_hand_written_file_bottom_to_top(tmp_path):
    # A 3x2 big-endian grey PFM written byte by byte: rows in the file go bottom row first.
    rows_top_to_bottom = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    body = struct.pack(">6f", *rows_top_to_bottom[1], *rows_top_to_bottom[0])
    path = tmp_path / "hand.pfm"
    path.write_bytes(b"Pf\n3 2\n1.0\n" + body)
    np.testing.assert_array_equal(read_pfm(path), np.array(rows_top_to_bottom, dtype=np.float32))
    # Width and height on separate lines (some writers do this) parse the same.
    path.write_bytes(b"Pf\n3\n2\n1.0\n" + body)
    np.testing.assert_array_equal(read_pfm(path), np.array(rows_top_to_bottom, dtype=np.float32))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"P6\n3 2\n255\n" + bytes(18), "expected 'PF'"),
        (b"Pf\n3 two\n-1.0\n" + bytes(24), "malformed PFM header"),
        (b"Pf\n3 2\n0\n" + bytes(24), "non-zero"),
        (b"Pf\n3 2\n-1.0\n" + bytes(10), "truncated"),
        (b"Pf\n3 2\n", "ends early"),
    ],
)
def test_pfm_malformed_names_file(tmp_path, content, needle):
    path = tmp_path / "bad.pfm"
    path.write_bytes(content)
    with pytest.raises(DataError, match=needle) as info:
        read_pfm(path)
    assert str(path) in str(info.value)


def test_pfm_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_pfm(tmp_path / "nope.pfm")
    assert "nope.pfm" in str(info.value)


def test_write_pfm_rejects_bad_shape(tmp_path):
    with pytest.raises(DataError, match="HxW or HxWx3"):
        write_pfm(tmp_path / "x.pfm", np.zeros((2, 3, 4)))
    assert not (tmp_path / "x.pfm").exists()


# ------------------------------------------------------------------------------------------------- images


def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)

    grey = rng.integers(0, 256, size=(6, 9), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    out = read_image(tmp_path / "grey.png")
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)

    rgba = np.concatenate([rgb, rng.integers(0, 256, size=(6, 9, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)

    deep = np.array([[0, 257, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png")[..., 0], [[0, 1, 255]])


def test_read_image_errors_name_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_image(tmp_path / "missing.png")
    assert "missing.png" in str(info.value)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="cannot read") as info:
        read_image(junk)
    assert str(junk) in str(info.value)


def test_read_mask(tmp_path):
    Image.fromarray(np.array([[255, 128, 0]], dtype=np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[True, False, False]])


# ------------------------------------------------------------------------------------------ disparity PNGs


def test_kitti_round_trip(tmp_path):
    # Multiples of 1/256 are stored exactly; 0 and non-finite become invalid.
    disp = np.array([[0.0, 1.0 / 256, 12.5], [255.99609375, np.nan, 3.25]], dtype=np.float32)
    path = tmp_path / "000000_10.png"
    write_kitti_disparity(path, disp)
    raw = np.asarray(Image.open(path))
    np.testing.assert_array_equal(raw, [[0, 1, 3200], [65535, 0, 832]])
    back, valid = read_kitti_disparity(path)
    np.testing.assert_array_equal(valid, [[False, True, True], [True, False, True]])
    np.testing.assert_array_equal(back[valid], disp[valid])
    assert back.dtype == np.float32


def test_kitti_valid_zero_disparity_survives(tmp_path):
    path = tmp_path / "z.png"
    write_kitti_disparity(path, np.zeros((1, 2)), valid=np.array([[True, False]]))
    _, valid = read_kitti_disparity(path)
    np.testing.assert_array_equal(valid, [[True, False]])


def test_kitti_errors(tmp_path):
    eight_bit = tmp_path / "8bit.png"
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(eight_bit)
    with pytest.raises(DataError, match="16-bit") as info:
        read_kitti_disparity(eight_bit)
    assert str(eight_bit) in str(info.value)
    with pytest.raises(DataError, match="exceeds"):
        write_kitti_disparity(tmp_path / "big.png", np.full((2, 2), 300.0))
    assert not (tmp_path / "big.png").exists()


def test_fsd_decoding_by_hand_and_round_trip(tmp_path):
    # (R, G, B) = (1, 2, 3) -> (1 * 255 * 255 + 2 * 255 + 3) / 1000 = (65025 + 510 + 3) / 1000 = 65.538
    assert decode_fsd_disparity(np.array([[[1, 2, 3]]], dtype=np.uint8))[0, 0] == pytest.approx(65.538)
    disp = np.array([[0.0, 0.001, 65.538], [254.999, 300.123, 1234.5]], dtype=np.float32)
    np.testing.assert_array_equal(encode_fsd_disparity(disp)[0, 2], [1, 2, 3])
    path = tmp_path / "0000.png"
    write_fsd_disparity(path, disp)
    back, valid = read_fsd_disparity(path)
    np.testing.assert_allclose(back, disp, atol=5e-4)
    np.testing.assert_array_equal(valid, disp > 0)


def test_fsd_rejects_16bit(tmp_path):
    path = tmp_path / "0000.png"
    Image.fromarray(np.zeros((2, 2), dtype=np.uint16)).save(path)
    with pytest.raises(DataError, match="RGB") as info:
        read_fsd_disparity(path)
    assert str(path) in str(info.value)


def test_write_disparity_png_colour_map(tmp_path):
    import matplotlib

    disp = np.array([[1.0, 2.0, 3.0], [np.inf, 2.0, 1.0]])
    path = write_disparity_png(tmp_path / "vis.png", disp)
    img = np.asarray(Image.open(path))
    assert img.shape == (2, 3, 3) and img.dtype == np.uint8
    turbo = matplotlib.colormaps["turbo"]
    np.testing.assert_array_equal(img[0, 0], np.round(np.array(turbo(0.0)[:3]) * 255))
    np.testing.assert_array_equal(img[0, 2], np.round(np.array(turbo(1.0)[:3]) * 255))
    np.testing.assert_array_equal(img[1, 0], [0, 0, 0])  # invalid is black


# --------------------------------------------------------------------------------------- calib and writes


MIDDEVAL_CALIB = """cam0=[1758.23 0 953.34; 0 1758.23 552.29; 0 0 1]
cam1=[1758.23 0 953.34; 0 1758.23 552.29; 0 0 1]
doffs=0
baseline=97.99
width=1920
height=1080
ndisp=290
isint=0
vmin=75
vmax=262
dyavg=0
dymax=0
"""


def test_read_calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(MIDDEVAL_CALIB)
    calib = read_calib(path)
    assert calib["cam0"].shape == (3, 3) and calib["cam0"][0, 0] == pytest.approx(1758.23)
    assert calib["cam0"][1, 2] == pytest.approx(552.29)
    assert calib["baseline"] == pytest.approx(97.99)
    assert (calib["width"], calib["height"], calib["ndisp"]) == (1920, 1080, 290)
    assert isinstance(calib["width"], int)
    write_calib(tmp_path / "again.txt", calib)
    again = read_calib(tmp_path / "again.txt")
    np.testing.assert_allclose(again["cam1"], calib["cam1"])
    assert again["vmax"] == calib["vmax"]


def test_read_calib_malformed(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("cam0=[1 0 0; 0 1 0; 0 0 1]\nbaseline 97\n")
    with pytest.raises(DataError, match="key=value") as info:
        read_calib(path)
    assert f"{path}:2" in str(info.value)
    path.write_text("cam0=[1 0; 0 1]\n")
    with pytest.raises(DataError, match="3x3"):
        read_calib(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
