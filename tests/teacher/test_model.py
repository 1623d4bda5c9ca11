"""Forward contract, intermediates, loading errors and inference helpers of the teacher."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from compress.errors import CheckpointError, ConfigError, DataError
from teacher import FoundationStereo, StereoOutput, TeacherConfig, infer, load_teacher

TINY = dict(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False, valid_iters=3)


@pytest.fixture(scope="module")
def tiny_teacher() -> FoundationStereo:
    torch.manual_seed(0)
    return FoundationStereo(TeacherConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    left = 255 * torch.rand(1, 3, 64, 128, generator=g)
    right = torch.cat([left[..., 4:], 255 * torch.rand(1, 3, 64, 4, generator=g)], dim=-1)
    return left, right


def test_test_and_training_mode_outputs(tiny_teacher, pair):
    left, right = pair
    with torch.no_grad():
        disp = tiny_teacher(left, right, iters=3, test_mode=True)
        init_disp, preds = tiny_teacher(left, right, iters=3)
    assert disp.shape == (1, 1, 64, 128) and torch.isfinite(disp).all()
    assert init_disp.shape == (1, 1, 16, 32)
    assert len(preds) == 3 and all(p.shape == (1, 1, 64, 128) for p in preds)
    assert torch.allclose(preds[-1], disp)
    # init_disp is a soft-argmin over max_disp / 4 levels
    assert 0 <= init_disp.min() and init_disp.max() <= 64 // 4 - 1


def test_intermediates_are_typed_and_complete(tiny_teacher, pair):
    left, right = pair
    with torch.no_grad():
        out = tiny_teacher(left, right, iters=2, return_intermediates=True)
    assert isinstance(out, StereoOutput)
    assert [f.shape[-2:] for f in out.features_left] == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert out.features_left[0].shape[1] == tiny_teacher.feature.d_out[0]
    assert out.vit_feat.shape == (1, 16, 16, 32)
    assert out.cost_volume.shape == (1, 8 + 24, 16, 16, 32)
    assert out.filtered_volume.shape == (1, 28, 16, 16, 32)
    assert out.cost_logits.shape == (1, 16, 16, 32)
    assert len(out.hidden_states) == 2 and len(out.hidden_states[0]) == 3
    assert [h.shape[-2:] for h in out.hidden_states[0]] == [(16, 32), (8, 16), (4, 8)]
    assert len(out.disp_lowres) == 2 and len(out.disp_preds) == 2
    # The upsampled prediction is 4x the low-res disparity in scale.
    ratio = out.disp_preds[-1].mean() / out.disp_lowres[-1].mean()
    assert 3.5 < float(ratio) < 4.5


def test_init_disp_argument_is_used(tiny_teacher, pair):
    left, right = pair
    given = torch.full((1, 1, 16, 32), 3.0)
    with torch.no_grad():
        init, _ = tiny_teacher(left, right, iters=1, init_disp=given)
    assert torch.equal(init, given)


def test_config_from_official_yaml(tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        yaml.safe_dump({"corr_levels": 2, "hidden_dims": [128, 128, 128], "max_disp": 416, "train_iters": 22,
                        "slow_fast_gru": False, "n_gru_layers": 3, "valid_iters": 32, "batch_size": 8})
    )
    cfg = TeacherConfig.from_yaml(tmp_path / "cfg.yaml")
    assert cfg.vit_size == "vitl" and cfg.max_disp == 416 and cfg.valid_iters == 32
    with pytest.raises(ConfigError, match="vit_size"):
        TeacherConfig(vit_size="vitg")
    with pytest.raises(ConfigError, match="max_disp"):
        TeacherConfig(max_disp=100)


def _save_tiny(tmp_path, model, fmt="pth", key="model"):
    TeacherConfig(**TINY).to_yaml(tmp_path / "cfg.yaml")
    sd = model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        # safetensors refuses shared storage; the aliased BatchNorm keys get their own copies.
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "model.pth"
        torch.save({key: sd} if key else sd, path)
    return path


@pytest.mark.parametrize("fmt,key", [("pth", "model"), ("pth", None), ("safetensors", None)])
def test_load_teacher_formats_roundtrip(tmp_path, tiny_teacher, pair, fmt, key):
    path = _save_tiny(tmp_path, tiny_teacher, fmt, key)
    loaded = load_teacher(path)
    left, right = pair
    with torch.no_grad():
        expected = tiny_teacher(left, right, iters=2, test_mode=True)
        assert torch.equal(loaded(left, right, iters=2, test_mode=True), expected)


def test_partial_checkpoint_error_names_keys(tmp_path, tiny_teacher):
    sd = dict(tiny_teacher.state_dict())
    dropped = [k for k in sd if k.startswith("update_block.")]
    for k in dropped:
        del sd[k]
    sd["extra.weight"] = torch.zeros(3)
    sd["proj_cmb.weight"] = torch.zeros(5, 5, 1, 1)
    TeacherConfig(**TINY).to_yaml(tmp_path / "cfg.yaml")
    torch.save({"model": sd}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError) as info:
        load_teacher(tmp_path / "model.pth")
    msg = str(info.value)
    assert f"{len(dropped)} missing keys" in msg and dropped[0] in msg
    assert "1 unexpected keys (extra.weight)" in msg
    assert "1 mis-shaped keys (proj_cmb.weight: checkpoint [5, 5, 1, 1] vs model [12, 112, 1, 1])" in msg
    assert "vit_size=vitt" in msg


def test_wrong_vit_size_is_named(tmp_path, tiny_teacher):
    path = _save_tiny(tmp_path, tiny_teacher)
    cfg = dict(TINY, vit_size="vits")
    with pytest.raises(CheckpointError, match="looks like vit_size=vitt but the config says vits"):
        load_teacher(path, cfg=TeacherConfig(**cfg))


def test_missing_cfg_and_bad_files(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no cfg.yaml beside"):
        load_teacher(tmp_path / "model.pth")
    TeacherConfig(**TINY).to_yaml(tmp_path / "cfg.yaml")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_teacher(tmp_path / "model.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="is not a state dict"):
        load_teacher(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "absent.pth")


def test_infer_pads_any_size_and_accepts_numpy_uint8(tiny_teacher):
    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    right = np.roll(left, -3, axis=1)
    disp = infer(tiny_teacher, left, right, iters=2)
    assert disp.shape == (1, 1, 70, 100) and disp.dtype == torch.float32
    # Same pair as float tensors gives the same answer.
    lt = torch.from_numpy(left).permute(2, 0, 1).float()
    rt = torch.from_numpy(right).permute(2, 0, 1).float()
    assert torch.allclose(infer(tiny_teacher, lt, rt, iters=2), disp)
    two_pass = infer(tiny_teacher, left, right, iters=2, hierarchical=True)
    assert two_pass.shape == (1, 1, 70, 100) and torch.isfinite(two_pass).all()


def test_infer_rejects_mismatched_and_non_rgb(tiny_teacher):
    with pytest.raises(DataError, match="differ in size"):
        infer(tiny_teacher, np.zeros((64, 64, 3), np.uint8), np.zeros((64, 96, 3), np.uint8))
    with pytest.raises(DataError, match="RGB"):
        infer(tiny_teacher, torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))


def test_nothing_reaches_the_network(monkeypatch, pair):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # Building the model is where timm would fetch pretrained weights; nothing may be fetched.
    model = FoundationStereo(TeacherConfig(**TINY)).eval()
    with torch.no_grad():
        model(*pair, iters=1, test_mode=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_forward_on_cuda_matches_cpu(tiny_teacher, pair):
    model = FoundationStereo(TeacherConfig(**TINY)).eval()
    model.load_state_dict(tiny_teacher.state_dict())
    left, right = pair
    with torch.no_grad():
        cpu = model(left, right, iters=2, test_mode=True)
        gpu = model.cuda()(left.cuda(), right.cuda(), iters=2, test_mode=True).cpu()
    assert (gpu - cpu).abs().max() < 1e-2
    model.cfg.mixed_precision = True
    with torch.no_grad():
        amp = model(left.cuda(), right.cuda(), iters=2, test_mode=True)
    assert amp.dtype == torch.float32 and torch.isfinite(amp).all()
