"""Depth, point clouds and PLY files on a synthetic scene whose depth is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from compress.errors import DataError
from compress.geometry import (
    StereoCalibration,
    depth_from_disparity,
    invisible_mask,
    point_cloud,
    read_intrinsics,
    read_ply,
    write_depth,
    write_ply,
)

FX, FY, CX, CY, BASELINE = 80.0, 90.0, 47.5, 31.0, 0.25
K = np.array([[FX, 0, CX], [0, FY, CY], [0, 0, 1]], dtype=np.float64)


def scene(h: int = 64, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A wall at 4 m with a box at 2 m in the middle; disparity = fx * baseline / z."""
    z = np.full((h, w), 4.0)
    z[20:40, 30:60] = 2.0
    return z, FX * BASELINE / z


def parse_ply(data: bytes) -> tuple[list[str], np.ndarray]:
    """An independent reader: the header lines and the vertex records as the header declares them."""
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    types = {"float": "<f4", "uchar": "u1"}
    props = [(ln.split()[2], types[ln.split()[1]]) for ln in header if ln.startswith("property")]
    count = int(next(ln for ln in header if ln.startswith("element vertex")).split()[2])
    return header, np.frombuffer(data[end:], dtype=np.dtype(props), count=count)


def test_depth_and_cloud_recover_the_scene(tmp_path) -> None:
    z, disp = scene()
    disp[0, 0] = 0.0  # no match: no depth, no point
    depth = depth_from_disparity(disp, FX, BASELINE)
    assert depth[0, 0] == 0.0
    np.testing.assert_allclose(depth[1:], z[1:], rtol=1e-6)

    colors = np.zeros(z.shape + (3,), dtype=np.uint8)
    colors[20:40, 30:60] = (255, 0, 0)
    points, rgb = point_cloud(depth, K, colors)
    assert len(points) == z.size - 1
    # The box's corner pixel (u=30, v=20) at 2 m back-projects through K.
    box = np.all(rgb == (255, 0, 0), axis=1)
    assert box.sum() == 20 * 30
    corner = points[box][np.argmin(points[box][:, 0] + points[box][:, 1])]
    np.testing.assert_allclose(corner, [(30 - CX) * 2 / FX, (20 - CY) * 2 / FY, 2.0], rtol=1e-5)

    path = write_ply(tmp_path / "cloud.ply", points, rgb)
    header, vertices = parse_ply(path.read_bytes())
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    assert [ln.split()[-1] for ln in header if ln.startswith("property")] == ["x", "y", "z", "red", "green", "blue"]
    np.testing.assert_array_equal(np.stack([vertices["x"], vertices["y"], vertices["z"]], 1), points)
    np.testing.assert_array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), rgb)
    back_points, back_rgb = read_ply(path)
    np.testing.assert_array_equal(back_points, points)
    np.testing.assert_array_equal(back_rgb, rgb)


def test_depth_is_bit_identical_to_the_former_definitions() -> None:
    """Deployment depth (0 for no depth) and the synthetic rig's (inf, with Middlebury's doffs) as they were."""
    from compress.data.synthetic import SyntheticConfig, generate_sample
    from compress.deploy.infer import disparity_to_geometry

    z, disp = scene()
    disp[0, :3] = (0.0, -1.0, np.nan)
    d64 = disp.astype(np.float64)
    ok = np.isfinite(d64) & (d64 > 0)
    former = np.zeros(d64.shape)
    former[ok] = FX * BASELINE / d64[ok]
    result = disparity_to_geometry(disp, np.zeros(z.shape + (3,), np.uint8), StereoCalibration(K, BASELINE))
    assert result.depth.dtype == np.float32
    np.testing.assert_array_equal(result.depth, former.astype(np.float32))

    sample = generate_sample(SyntheticConfig(height=32, width=64, max_disp=12.0, seed=5))
    f, baseline, doffs = sample.calib["cam0"][0, 0], sample.calib["baseline"], 1.5
    d = sample.disp.astype(np.float64) + doffs
    with np.errstate(divide="ignore"):
        former_synthetic = np.where(d > 0, f * baseline / np.where(d > 0, d, 1.0), np.inf)
    np.testing.assert_array_equal(
        depth_from_disparity(sample.disp, f, baseline, doffs, invalid=np.inf), former_synthetic.astype(np.float32)
    )
    assert np.isinf(depth_from_disparity(np.array([-doffs, 0.0]), f, baseline, doffs, invalid=np.inf)[0])


def test_zfar_and_invisible_points_are_dropped() -> None:
    z, disp = scene()
    depth = depth_from_disparity(disp, FX, BASELINE)
    near, _ = point_cloud(depth, K, zfar=3.0)
    assert len(near) == 20 * 30 and np.all(near[:, 2] == pytest.approx(2.0))
    # disparity 5 px at 4 m: the first 5 columns match outside the right image.
    invisible = invisible_mask(disp)
    assert invisible[:, :5].all() and not invisible[:, 5:].any()
    kept, _ = point_cloud(depth, K, keep=~invisible)
    assert len(kept) == z.size - 5 * z.shape[0]


def test_intrinsics_file_and_scaling(tmp_path) -> None:
    path = tmp_path / "K.txt"
    path.write_text(" ".join(f"{v:g}" for v in K.ravel()) + f"\n{BASELINE}\n")
    calib = read_intrinsics(path)
    np.testing.assert_array_equal(calib.K, K)
    assert calib.baseline == BASELINE and calib.fx == FX
    half = calib.scaled(0.5)
    np.testing.assert_allclose(half.K[:2], K[:2] * 0.5)
    assert half.K[2, 2] == 1.0 and half.baseline == BASELINE
    # Halving the image halves the disparity and the focal length: depth is unchanged.
    z, disp = scene()
    np.testing.assert_allclose(depth_from_disparity(disp / 2, half.fx, half.baseline), z, rtol=1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 0 0 0 1 0 0 0 1\n", "line 2"),
        ("1 0 0 0 1 0 0 1\n0.1\n", ":1: has 8 numbers"),
        ("1 0 0 0 1 0 0 0 1\nfar\n", "could not convert"),
        ("1 0 0 0 1 0 0 0 1\n-0.1\n", "baseline"),
    ],
)
def test_bad_intrinsics_files_say_what_was_expected(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "K.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_intrinsics(path)
    assert str(path) in str(err.value)


def test_depth_files(tmp_path) -> None:
    z, _ = scene()
    z[0, 0] = 0.0
    z[0, 1] = 70.0  # beyond a 16-bit millimetre PNG
    write_depth(tmp_path / "d.png", z)
    raw = np.asarray(Image.open(tmp_path / "d.png"))
    assert raw.dtype == np.uint16 and raw[0, 0] == 0 and raw[0, 1] == 0
    np.testing.assert_array_equal(raw[1:], np.rint(z[1:] * 1000).astype(np.uint16))
    write_depth(tmp_path / "d.npy", z)
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), z.astype(np.float32))
    with pytest.raises(DataError, match="unknown depth format"):
        write_depth(tmp_path / "d.tif", z)


def test_calibration_is_immutable_under_scaling() -> None:
    calib = StereoCalibration(K.copy(), BASELINE)
    calib.scaled(0.25)
    np.testing.assert_array_equal(calib.K, K)
