"""Teacher pseudo-label cache: equality with a direct teacher run, crash resume, mismatch errors, crops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compress.data import SyntheticConfig, SyntheticStereoDataset
from compress.distill.config import LabelCacheConfig
from compress.distill.label_cache import (
    LabelCache,
    LabelCacheError,
    LabelledDataset,
    build_label_cache,
    cache_progress,
    dataset_fingerprint,
    teacher_identity,
)
from teacher import FoundationStereo, TeacherConfig
from tests.paths import REPO
from tests.stereo_toy import make_toy


class CountingTeacher(nn.Module):
    """Forwards to a teacher and counts the calls (labelling must not repeat finished samples)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.teacher(*args, **kwargs)


def _dataset(n: int = 3, seed: int = 0) -> SyntheticStereoDataset:
    # 36x70 is not a multiple of 32: the cache centre-crops every sample to 32x64.
    return SyntheticStereoDataset(n, SyntheticConfig(height=36, width=70, max_disp=12, num_objects=2, seed=seed))


CFG = LabelCacheConfig(disp_dtype="float32", prob_dtype="float32", feature_dtype="float32", feature_levels=[0, 1],
                       flush_every=2)


@pytest.fixture(scope="module")
def tiny_teacher() -> FoundationStereo:
    torch.manual_seed(0)
    cfg = TeacherConfig(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False)
    return FoundationStereo(cfg).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_teacher) -> Path:
    root = tmp_path_factory.mktemp("labels")
    build_label_cache(tiny_teacher, _dataset(), root, CFG, iters=2, progress=False)
    return root


def test_labels_equal_a_direct_teacher_run(cache_dir: Path, tiny_teacher: FoundationStereo) -> None:
    cache = LabelCache(cache_dir)
    assert cache.complete and cache.size == (32, 64) and len(cache) == 3
    assert cache.teacher == teacher_identity(tiny_teacher)
    item = LabelledDataset(_dataset(), cache)[1]
    assert item["left"].shape == (3, 32, 64)
    full = _dataset()[1]
    assert torch.equal(item["left"], full["left"][:, 2:34, 3:67])  # the centre 32x64 window
    with torch.no_grad():
        out = tiny_teacher(item["left"][None], item["right"][None], iters=2, test_mode=True, return_intermediates=True)
    assert torch.allclose(item["teacher_disp"], out.disp[0], atol=1e-5)
    assert torch.allclose(item["teacher_prob"], torch.softmax(out.cost_logits, dim=1)[0], atol=1e-6)
    assert item["teacher_prob_scale"] == 4
    assert set(item["teacher_feat"]) == {"4", "8"}
    assert torch.allclose(item["teacher_feat"]["4"], out.features_left[0][0], atol=1e-5)
    assert torch.allclose(item["teacher_feat"]["8"], out.features_left[1][0], atol=1e-5)
    # Bytes per sample follow the documented formula (float32 everywhere here).
    d = out.cost_logits.shape[1]
    c0, c1 = out.features_left[0].shape[1], out.features_left[1].shape[1]
    want = 4 * (32 * 64 + d * 8 * 16 + c0 * 8 * 16 + c1 * 4 * 8)
    assert cache.bytes_per_sample() == want
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["done"] == [[0, 3]] and manifest["complete"] is True
    assert manifest["names"] == [f"synthetic_s0_{i:05d}" for i in range(3)]


def test_labelled_dataset_crops_labels_with_the_images(cache_dir: Path) -> None:
    ds = LabelledDataset(_dataset(), cache_dir, crop_size=(32, 32), jitter_prob=1.0, seed=5)
    plain = LabelledDataset(_dataset(), cache_dir)
    cache = LabelCache(cache_dir)
    assert cache.align() == 8  # the coarsest stored field is the 1/8 feature
    offsets = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item, full = ds[i], plain[i]
            # Jitter changes colours, never geometry: locate the crop by the ground truth.
            matches = [x for x in range(0, 33, 8) if torch.equal(item["disp"], full["disp"][..., x : x + 32])]
            assert matches, "the crop window is not aligned to the label stride"
            x = matches[0]
            offsets.add(x)
            assert not torch.equal(item["left"], full["left"][..., x : x + 32])  # jittered
            assert torch.equal(item["teacher_disp"], full["teacher_disp"][..., x : x + 32])
            assert torch.equal(item["teacher_prob"], full["teacher_prob"][..., x // 4 : x // 4 + 8])
            assert torch.equal(item["teacher_feat"]["8"], full["teacher_feat"]["8"][..., x // 8 : x // 8 + 4])
    assert len(offsets) > 1
    with pytest.raises(Exception, match="multiples of 8"):
        LabelledDataset(_dataset(), cache_dir, crop_size=(32, 36))


def test_mismatching_manifest_raises_without_running_the_teacher(cache_dir: Path, tiny_teacher) -> None:
    counting = CountingTeacher(tiny_teacher)
    ident = teacher_identity(tiny_teacher)
    other = {**ident, "weights_sha256": "0" * 64}
    with pytest.raises(LabelCacheError, match="weights_sha256"):
        build_label_cache(counting, _dataset(), cache_dir, CFG, identity=other, iters=2, progress=False)
    with pytest.raises(LabelCacheError, match="dataset"):
        build_label_cache(counting, _dataset(seed=1), cache_dir, CFG, identity=ident, iters=2, progress=False)
    half = LabelCacheConfig(**{**CFG.__dict__, "disp_dtype": "float16"})
    with pytest.raises(LabelCacheError, match="disp_dtype"):
        build_label_cache(counting, _dataset(), cache_dir, half, identity=ident, iters=2, progress=False)
    assert counting.calls == 0
    # A finished cache with the same identity is reused as is.
    build_label_cache(counting, _dataset(), cache_dir, CFG, identity=ident, iters=2, progress=False)
    assert counting.calls == 0
    with pytest.raises(LabelCacheError, match="another dataset"):
        LabelledDataset(_dataset(seed=1), cache_dir)


def test_topk_and_pooled_distribution(tmp_path: Path) -> None:
    toy = make_toy(seed=1, max_disp=8)
    cfg = LabelCacheConfig(prob="topk", prob_topk=3, prob_downsample=2, prob_dtype="float32")
    cache = build_label_cache(toy, _dataset(2), tmp_path, cfg, iters=2, progress=False)
    assert set(cache.fields) == {"disp", "prob_topk_values", "prob_topk_index"}
    assert cache.fields["prob_topk_values"]["shape"] == [3, 4, 8]  # 1/4 volume pooled by 2
    assert cache.bytes_per_sample() == 32 * 64 * 2 + 3 * 4 * 8 * (4 + 2)
    item = LabelledDataset(_dataset(2), cache)[0]
    with torch.no_grad():
        out = toy(item["left"][None], item["right"][None], iters=2, return_intermediates=True)
    pooled = torch.nn.functional.avg_pool2d(torch.softmax(out.cost_logits, dim=1), 2)[0]
    top = torch.topk(pooled, 3, dim=0)
    want = torch.zeros_like(pooled).scatter_(0, top.indices, top.values)
    want = want / want.sum(dim=0, keepdim=True)
    assert torch.allclose(item["teacher_prob"], want, atol=1e-6)
    assert item["teacher_prob"].shape == (8, 4, 8)


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from torch import nn
    from tests.compress.distill.test_label_cache import CFG_TOY, _dataset
    from tests.stereo_toy import make_toy
    from compress.distill.label_cache import build_label_cache, teacher_identity

    class KilledAfter(nn.Module):
        def __init__(self, teacher, calls):
            super().__init__()
            self.teacher, self.left = teacher, calls
        def forward(self, *args, **kwargs):
            if self.left == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: nothing gets saved on the way out
            self.left -= 1
            return self.teacher(*args, **kwargs)

    toy = make_toy(seed=2)
    build_label_cache(KilledAfter(toy, 3), _dataset(6), Path(sys.argv[1]), CFG_TOY,
                      identity=teacher_identity(toy), iters=2, progress=False)
    """
)

CFG_TOY = LabelCacheConfig(disp_dtype="float32", prob_dtype="float32", feature_levels=[0], flush_every=2)


def test_killed_labelling_resumes_without_recomputing(tmp_path: Path, capsys) -> None:
    toy = make_toy(seed=2)
    ident = teacher_identity(toy)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(killed), str(REPO)], env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Three samples were labelled, but only the first two were flushed (flush_every=2) before the kill.
    assert cache_progress(killed) == (2, 6)
    counting = CountingTeacher(toy)
    cache = build_label_cache(counting, _dataset(6), killed, CFG_TOY, identity=ident, iters=2, progress=False)
    assert counting.calls == 4 and cache.complete
    assert f"labels: 2 of 6 pairs cached in {killed}, labelling the rest\n" in capsys.readouterr().out  # no progress
    whole = build_label_cache(toy, _dataset(6), tmp_path / "whole", CFG_TOY, iters=2, progress=False)
    for name in whole.fields:
        assert np.array_equal(np.load(killed / f"{name}.npy"), np.load(tmp_path / "whole" / f"{name}.npy")), name
    assert json.loads((killed / "manifest.json").read_text())["done"] == [[0, 6]]


def test_partial_cache_refuses_to_serve_labels(tmp_path: Path) -> None:
    toy = make_toy(seed=2)

    class Crash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("teacher crashed")
            return toy(*args, **kwargs)

    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_label_cache(Crash(), _dataset(4), tmp_path, CFG_TOY, identity=teacher_identity(toy), iters=2,
                          progress=False)
    # An ordinary exception still saves the finished samples.
    assert cache_progress(tmp_path) == (2, 4)
    with pytest.raises(LabelCacheError, match="2 of 4"):
        LabelledDataset(_dataset(4), tmp_path)


def test_fingerprint_leaves_out_generator_features_that_are_off(tmp_path):
    from compress.data.io import write_image

    plain = dataset_fingerprint(SyntheticStereoDataset(2, SyntheticConfig(height=32, width=64, max_disp=12)))
    # What a cache made before photo textures and per-sample ranges existed recorded: unchanged.
    assert not {"texture_dir", "photo_prob", "max_disp_low"} & set(plain["synthetic"])
    write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    on = SyntheticConfig(height=32, width=64, max_disp=12, texture_dir=str(tmp_path), max_disp_low=6)
    fp = dataset_fingerprint(SyntheticStereoDataset(2, on))["synthetic"]
    assert fp["texture_dir"] == str(tmp_path) and fp["photo_prob"] == 0.5 and fp["max_disp_low"] == 6


def test_images_smaller_than_the_cache_size_are_named_height_by_width(tmp_path: Path, tiny_teacher) -> None:

    from compress.errors import DataError

    with pytest.raises(DataError, match=r"is 36x70 \(height x width\), smaller than the label cache size 64x64"):
        build_label_cache(tiny_teacher, _dataset(1), tmp_path / "labels", CFG, iters=2, size=[64, 64],
                          progress=False)  # the images are 36 high, 70 wide


def test_labels_default_to_the_teachers_own_iterations(tmp_path: Path, tiny_teacher) -> None:
    root = tmp_path / "labels"
    build_label_cache(tiny_teacher, _dataset(1), root, CFG, progress=False)
    labels = LabelCache(root).manifest["labels"]
    assert labels["iters"] == tiny_teacher.cfg.valid_iters == 32
    # The manifest records the same settings, in the same order, as when iters and size were keys of the label
    # cache section: caches labelled before still match.
    assert list(labels) == ["disp_dtype", "prob", "prob_downsample", "prob_dtype", "feature_levels", "feature_dtype",
                            "iters", "size"]
