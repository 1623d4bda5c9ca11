"""Dataset readers on tiny files written in each dataset's own layout, including malformed variants."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from compress.data.io import (
    write_calib,
    write_fsd_disparity,
    write_image,
    write_kitti_disparity,
    write_mask,
    write_pfm,
)
from compress.data.readers import (
    ETH3DDataset,
    FSDDataset,
    Kitti2012Dataset,
    Kitti2015Dataset,
    MiddleburyDataset,
    SceneFlowDataset,
    StereoPairFolder,
    StereoSample,
    open_dataset,
    sample_to_tensors,
)
from compress.errors import ConfigError, DataError

H, W = 32, 64


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _disp(seed: int, h: int = H, w: int = W) -> np.ndarray:
    # Multiples of 1/256 survive every format exactly (KITTI stores d * 256).
    raw = np.random.default_rng(seed).integers(256, 40 * 256, size=(h, w))
    return (raw / 256.0).astype(np.float32)


def _raises_naming(path, func, *args, match=None):
    with pytest.raises(DataError, match=match) as info:
        func(*args)
    assert str(path) in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- SceneFlow


def _make_sceneflow(root, subset="FlyingThings3D", seq="TRAIN/A/0000", frames=(6, 7), seed=0):
    base = root / subset
    for i, frame in enumerate(frames):
        name = f"{frame:04d}"
        write_image(base / "frames_cleanpass" / seq / "left" / f"{name}.png", _rgb(seed + 3 * i))
        write_image(base / "frames_cleanpass" / seq / "right" / f"{name}.png", _rgb(seed + 3 * i + 1))
        write_pfm(base / "disparity" / seq / "left" / f"{name}.pfm", _disp(seed + 3 * i + 2), little_endian=i % 2 == 0)
    return base


def test_sceneflow_reads_and_detects(tmp_path):
    _make_sceneflow(tmp_path, "FlyingThings3D", "TRAIN/A/0000", frames=(6, 7))
    _make_sceneflow(tmp_path, "FlyingThings3D", "TEST/A/0001", frames=(6,), seed=10)
    _make_sceneflow(tmp_path, "Monkaa", "a_rain_of_stones_x2", frames=(0,), seed=20)
    ds = open_dataset(tmp_path)
    assert isinstance(ds, SceneFlowDataset) and len(ds) == 4
    names = [r.name for r in ds.records]
    assert "FlyingThings3D/clean/TRAIN/A/0000/left/0006" in names
    i = names.index("FlyingThings3D/clean/TRAIN/A/0000/left/0007")
    sample = ds.load(i)
    np.testing.assert_array_equal(sample.left, _rgb(3))
    np.testing.assert_array_equal(sample.right, _rgb(4))
    np.testing.assert_array_equal(sample.disp, _disp(5))
    item = ds[i]
    assert item["left"].shape == (3, H, W) and item["left"].dtype == torch.float32
    assert float(item["left"].max()) <= 255 and item["disp"].shape == (1, H, W)
    assert item["valid"].dtype == torch.bool and bool(item["valid"].all()) and bool(item["has_gt"])
    assert len(SceneFlowDataset(tmp_path, split="TEST")) == 1


def test_sceneflow_missing_right_and_bad_disparity(tmp_path):
    base = _make_sceneflow(tmp_path)
    right = base / "frames_cleanpass/TRAIN/A/0000/right/0007.png"
    right.unlink()
    msg = _raises_naming(right, SceneFlowDataset, tmp_path, match="no matching right image")
    assert "0007.png" in msg
    write_image(right, _rgb(4))
    disp = base / "disparity/TRAIN/A/0000/left/0006.pfm"
    disp.write_bytes(b"P5\n64 32\n255\n" + bytes(H * W))
    _raises_naming(disp, SceneFlowDataset(tmp_path).load, 0, match="expected 'PF'")
    write_pfm(disp, _disp(0, h=H, w=W - 1))
    _raises_naming(disp, SceneFlowDataset(tmp_path).load, 0, match="same size")
    disp.unlink()
    _raises_naming(disp, SceneFlowDataset, tmp_path, match="no ground-truth disparity")


# --------------------------------------------------------------------------------------------- Middlebury


def _make_scene(folder, seed=0, gt_name="disp0GT.pfm", mask=True, calib=True, grey=False):
    shutil.rmtree(folder, ignore_errors=True)
    left, right = _rgb(seed), _rgb(seed + 1)
    if grey:
        left, right = left[..., 0], right[..., 0]
    write_image(folder / "im0.png", left)
    write_image(folder / "im1.png", right)
    disp = _disp(seed + 2)
    disp[0, :5] = np.inf  # unknown ground truth
    if gt_name:
        write_pfm(folder / gt_name, disp)
    nonocc = np.ones((H, W), dtype=bool)
    nonocc[:, :3] = False
    if mask:
        write_image(folder / "mask0nocc.png", np.where(nonocc, 255, 128).astype(np.uint8))
    if calib:
        k = np.array([[500.0, 0, 31.5], [0, 500.0, 15.5], [0, 0, 1]])
        write_calib(folder / "calib.txt", {"cam0": k, "cam1": k, "doffs": 0.0, "baseline": 120.5,
                                           "width": W, "height": H, "ndisp": 64, "isint": 0})
    return disp, nonocc


def test_middlebury_reads_gt_mask_and_calib(tmp_path):
    root = tmp_path / "MiddEval3" / "trainingQ"
    disp, nonocc = _make_scene(root / "Adirondack", seed=0)
    _make_scene(root / "Motorcycle", seed=5, gt_name="disp0.pfm", mask=False, calib=False)  # 2014 style
    ds = open_dataset(tmp_path)
    assert type(ds) is MiddleburyDataset and len(ds) == 2
    sample = ds.load(0)
    assert sample.name == "MiddEval3/trainingQ/Adirondack"
    assert not sample.valid[0, :5].any() and sample.valid[1:].all()
    np.testing.assert_array_equal(sample.disp[sample.valid], disp[np.isfinite(disp)])
    np.testing.assert_array_equal(sample.nonocc, nonocc)
    assert sample.calib["cam0"][0, 0] == 500.0 and sample.calib["baseline"] == 120.5
    assert sample.calib["ndisp"] == 64
    item = ds[0]
    assert float(item["disp"][0, 0, 0]) == 0.0  # inf replaced so masked losses stay finite
    assert bool(item["nonocc"][0, 1, 3]) and not bool(item["nonocc"][0, 1, 2])
    assert ds.load(1).nonocc is None and ds.load(1).calib is None


def test_middlebury_malformed(tmp_path):
    scene = tmp_path / "Adirondack"
    _make_scene(scene)
    (scene / "disp0GT.pfm").write_bytes(b"garbage\n")
    _raises_naming(scene / "disp0GT.pfm", MiddleburyDataset(tmp_path).load, 0, match="not a PFM")
    _make_scene(scene)
    (scene / "im1.png").unlink()
    _raises_naming(scene / "im1.png", MiddleburyDataset, tmp_path, match="no matching right image")
    _make_scene(scene)
    write_image(scene / "mask0nocc.png", np.zeros((H + 1, W), dtype=np.uint8))
    _raises_naming(scene / "mask0nocc.png", MiddleburyDataset(tmp_path).load, 0, match="same size")
    _make_scene(scene)
    (scene / "calib.txt").write_text((scene / "calib.txt").read_text().replace("width=64", "width=65"))
    _raises_naming(scene / "calib.txt", MiddleburyDataset(tmp_path).load, 0, match="width=65")
    _make_scene(scene, gt_name=None)
    msg = _raises_naming(scene, MiddleburyDataset, tmp_path, match="no ground-truth disparity")
    assert "require_gt=False" in msg
    assert MiddleburyDataset(tmp_path, require_gt=False).load(0).disp is None


# ----------------------------------------------------------------------------------------------- ETH3D


def test_eth3d_grey_images_and_separate_gt(tmp_path):
    images, gt = tmp_path / "two_view_training", tmp_path / "two_view_training_gt"
    disp, nonocc = _make_scene(images / "delivery_area_1l", seed=3, gt_name=None, mask=False, grey=True)
    write_pfm(gt / "delivery_area_1l" / "disp0GT.pfm", disp)
    write_mask(gt / "delivery_area_1l" / "mask0nocc.png", nonocc)
    ds = open_dataset(images, kind="eth3d", gt_root=gt)
    assert isinstance(ds, ETH3DDataset) and len(ds) == 1
    sample = ds.load(0)
    assert sample.left.shape == (H, W, 3)
    np.testing.assert_array_equal(sample.left[..., 2], _rgb(3)[..., 0])
    np.testing.assert_array_equal(sample.nonocc, nonocc)
    np.testing.assert_array_equal(sample.disp[sample.valid], disp[np.isfinite(disp)])


def test_eth3d_size_mismatch(tmp_path):
    scene = tmp_path / "playground_1l"
    _make_scene(scene, grey=True)
    write_image(scene / "im1.png", _rgb(1, h=H, w=W + 2))
    msg = _raises_naming(scene / "im1.png", ETH3DDataset(tmp_path).load, 0,
                         match="right image is 32x66 \\(height x width\\)")
    assert str(scene / "im0.png") in msg


# ------------------------------------------------------------------------------------------------- KITTI


def _make_kitti(root, left_dir, right_dir, occ_dir, noc_dir, n=2):
    truths = []
    for i in range(n):
        name = f"{i:06d}_10.png"
        write_image(root / "training" / left_dir / name, _rgb(10 * i))
        write_image(root / "training" / right_dir / name, _rgb(10 * i + 1))
        write_image(root / "training" / left_dir / f"{i:06d}_11.png", _rgb(10 * i + 2))  # no GT for _11
        disp = _disp(10 * i + 3)
        occ_valid = np.random.default_rng(i).random((H, W)) > 0.3  # sparse, like LiDAR
        noc_valid = occ_valid & (np.arange(W)[None, :] > 10)
        write_kitti_disparity(root / "training" / occ_dir / name, disp, occ_valid)
        write_kitti_disparity(root / "training" / noc_dir / name, disp, noc_valid)
        truths.append((disp, occ_valid, noc_valid))
    return truths


@pytest.mark.parametrize(
    ("cls", "dirs"),
    [
        (Kitti2015Dataset, ("image_2", "image_3", "disp_occ_0", "disp_noc_0")),
        (Kitti2012Dataset, ("colored_0", "colored_1", "disp_occ", "disp_noc")),
    ],
)
def test_kitti_reads_sparse_gt(tmp_path, cls, dirs):
    truths = _make_kitti(tmp_path, *dirs)
    ds = open_dataset(tmp_path)
    assert type(ds) is cls and len(ds) == 2
    sample = ds.load(1)
    disp, occ_valid, noc_valid = truths[1]
    assert sample.name == "000001_10"
    np.testing.assert_array_equal(sample.valid, occ_valid)
    np.testing.assert_array_equal(sample.nonocc, noc_valid)
    np.testing.assert_array_equal(sample.disp[occ_valid], disp[occ_valid])
    np.testing.assert_array_equal(sample.right, _rgb(11))
    # Pointing at training/ directly works too.
    assert len(cls(tmp_path / "training")) == 2


def test_kitti2015_malformed(tmp_path):
    _make_kitti(tmp_path, "image_2", "image_3", "disp_occ_0", "disp_noc_0")
    gt = tmp_path / "training" / "disp_occ_0" / "000000_10.png"
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(gt)
    _raises_naming(gt, Kitti2015Dataset(tmp_path).load, 0, match="16-bit")


def test_kitti2012_missing_right_and_testing_split(tmp_path):
    _make_kitti(tmp_path, "colored_0", "colored_1", "disp_occ", "disp_noc")
    right = tmp_path / "training" / "colored_1" / "000001_10.png"
    right.unlink()
    _raises_naming(right, Kitti2012Dataset, tmp_path, match="no matching right image")
    testing = tmp_path / "testing"
    write_image(testing / "colored_0" / "000000_10.png", _rgb(0))
    write_image(testing / "colored_1" / "000000_10.png", _rgb(1))
    ds = Kitti2012Dataset(tmp_path, split="testing")
    assert len(ds) == 1 and ds.load(0).disp is None and not bool(ds[0]["has_gt"])


# --------------------------------------------------------------------------------------------------- FSD


def _make_fsd(root, scene="manipulation_v5_realistic_kitchen_2500_1", n=2):
    base = root / scene / "dataset" / "data"
    disps = []
    for i in range(n):
        name = f"{i:04d}"
        write_image(base / "left" / "rgb" / f"{name}.jpg", _rgb(i))
        write_image(base / "right" / "rgb" / f"{name}.jpg", _rgb(i + 1))
        disp = _disp(i + 2) * 3.123
        write_fsd_disparity(base / "left" / "disparity" / f"{name}.png", disp)
        disps.append(disp)
    return base, disps


def test_fsd_reads_rgb_coded_disparity(tmp_path):
    base, disps = _make_fsd(tmp_path)
    ds = open_dataset(tmp_path)
    assert isinstance(ds, FSDDataset) and len(ds) == 2
    sample = ds.load(1)
    assert sample.name.endswith("dataset/data/0001")
    np.testing.assert_allclose(sample.disp, disps[1], atol=5e-4)
    assert sample.valid.all()
    # JPEG is lossy: the read image is close to, not equal to, what was written.
    assert np.abs(sample.left.astype(int) - _rgb(1)).mean() < 60


def test_fsd_malformed(tmp_path):
    base, _ = _make_fsd(tmp_path)
    disp = base / "left" / "disparity" / "0001.png"
    Image.fromarray(np.zeros((H, W), dtype=np.uint16)).save(disp)
    _raises_naming(disp, FSDDataset(tmp_path).load, 1, match="8-bit RGB")
    disp.unlink()
    _raises_naming(disp, FSDDataset, tmp_path, match="no ground-truth disparity")


# ------------------------------------------------------------------------------------------ unlabeled pairs


def test_pairs_left_right_folders(tmp_path):
    for i in range(3):
        write_image(tmp_path / "left" / f"frame{i}.png", _rgb(i))
        write_image(tmp_path / "right" / f"frame{i}.png", _rgb(i + 10))
    ds = open_dataset(tmp_path)
    assert isinstance(ds, StereoPairFolder) and len(ds) == 3
    item = ds[2]
    assert item["name"] == "frame2" and not bool(item["has_gt"]) and not bool(item["valid"].any())
    np.testing.assert_array_equal(item["right"].permute(1, 2, 0).numpy(), _rgb(12))
    (tmp_path / "right" / "frame1.png").unlink()
    _raises_naming(tmp_path / "right" / "frame1.png", StereoPairFolder, tmp_path, match="no matching right")


def test_pairs_suffix_and_im0_layouts(tmp_path):
    flat = tmp_path / "flat"
    write_image(flat / "a_left.png", _rgb(0))
    write_image(flat / "a_right.png", _rgb(1))
    write_image(flat / "b_left.jpg", _rgb(2))
    write_image(flat / "b_right.jpg", _rgb(3))
    ds = open_dataset(flat)
    assert isinstance(ds, StereoPairFolder) and [r.name for r in ds.records] == ["a", "b"]
    scenes = tmp_path / "scenes"
    for name in ("s1", "s2"):
        write_image(scenes / name / "im0.png", _rgb(4))
        write_image(scenes / name / "im1.png", _rgb(5))
    ds = open_dataset(scenes)
    assert isinstance(ds, StereoPairFolder) and [r.name for r in ds.records] == ["s1", "s2"]
    (flat / "b_right.jpg").unlink()
    _raises_naming(flat / "b_left.jpg", StereoPairFolder, flat, match="no matching right")


def test_pairs_size_mismatch_and_unreadable(tmp_path):
    write_image(tmp_path / "left" / "x.png", _rgb(0))
    write_image(tmp_path / "right" / "x.png", _rgb(1, h=H + 4))
    _raises_naming(tmp_path / "right" / "x.png", StereoPairFolder(tmp_path).load, 0, match="same size")
    (tmp_path / "right" / "x.png").write_bytes(b"\x89PNG broken")
    _raises_naming(tmp_path / "right" / "x.png", StereoPairFolder(tmp_path).load, 0, match="cannot read")


# -------------------------------------------------------------------------------------------- open_dataset


def test_open_dataset_reports_layouts_tried(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        open_dataset(tmp_path / "empty")
    msg = str(info.value)
    for kind in ("kitti2015", "kitti2012", "sceneflow", "fsd", "middlebury", "pairs"):
        assert kind in msg
    assert str(tmp_path / "empty") in msg
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(ConfigError, match="unknown dataset kind"):
        open_dataset(tmp_path / "empty", kind="sintel")
    (tmp_path / "empty" / "left").mkdir()
    (tmp_path / "empty" / "right").mkdir()
    _raises_naming(tmp_path / "empty" / "left", open_dataset, tmp_path / "empty", match="holds no images")


def test_dataloader_batches_and_transform_rng(tmp_path):
    for i in range(4):
        _make_scene(tmp_path / f"scene{i}", seed=i)
    calls = []

    def transform(sample: StereoSample, rng: np.random.Generator) -> StereoSample:
        calls.append(sample.name)
        shift = int(rng.integers(0, 256))
        return StereoSample(sample.left + np.uint8(shift), sample.right, sample.disp, sample.valid, sample.name)

    ds = open_dataset(tmp_path, transform=transform, seed=7)
    first, again = ds[1]["left"], ds[1]["left"]
    assert torch.equal(first, again)  # same (seed, epoch, index) -> same draw
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["left"], first)
    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["left"].shape == (2, 3, H, W) and batch["valid"].shape == (2, 1, H, W)
    assert batch["name"] == ["scene0", "scene1"]
    assert ds.check(progress=False) == []
    shutil.rmtree(tmp_path / "scene2")
    problems = ds.check(progress=False)
    assert len(problems) == 1 and "scene2" in problems[0]
    with pytest.raises(IndexError):
        ds[10]


def test_stereo_sample_validation():
    with pytest.raises(DataError, match="right image is 31x64 \\(height x width\\)"):
        StereoSample(_rgb(0), _rgb(1, h=H - 1), name="x")
    with pytest.raises(DataError, match="uint8 HxWx3"):
        StereoSample(_rgb(0).astype(np.float32), _rgb(1))
    s = StereoSample(_rgb(0), _rgb(1), disp=np.array(_disp(0)))
    assert s.valid.all()
    t = sample_to_tensors(s)
    assert torch.equal(t["nonocc"], t["valid"])
