"""A teacher checkpoint that preflight read and checked is not read again when the run loads it moments later."""

from __future__ import annotations

import os

import pytest
import torch

import teacher.loading as loading
from compress import preflight
from teacher import FoundationStereo, TeacherConfig, load_teacher

TINY = dict(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False, valid_iters=3)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = FoundationStereo(TeacherConfig(**TINY)).eval()
    TeacherConfig(**TINY).to_yaml(tmp_path / "cfg.yaml")
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    return tmp_path / "model.pth", model


@pytest.fixture
def reads(monkeypatch):
    """The files actually read from disk (the cache aside), in order."""
    done: list[str] = []
    real = loading._read_state_dict

    def counting(path, trust_pickle):
        done.append(path.name)
        return real(path, trust_pickle)

    monkeypatch.setattr(loading, "_read_state_dict", counting)
    monkeypatch.setattr(loading, "_last_teacher_read", None)
    return done


def test_preflight_then_load_reads_the_file_once_and_keeps_nothing_after(checkpoint, reads):
    path, model = checkpoint
    preflight.check_checkpoint(path, key="teacher.checkpoint")
    loaded = load_teacher(path)
    assert reads == ["model.pth"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    assert loading._last_teacher_read is None  # the run's model holds the weights, the cache no second copy
    load_teacher(path)
    assert reads == ["model.pth", "model.pth"]  # nothing kept: a second load reads again


def test_a_file_changed_after_preflight_is_read_again(checkpoint, reads):
    path, model = checkpoint
    preflight.check_checkpoint(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["proj_cmb.weight"].fill_(0.5)
    torch.save({"model": state}, path)
    later = path.stat().st_mtime_ns + 10_000_000  # file times tick coarsely: make the rewrite visible in them
    os.utime(path, ns=(later, later))
    loaded = load_teacher(path)
    assert reads == ["model.pth", "model.pth"]
    assert bool((loaded.state_dict()["proj_cmb.weight"] == 0.5).all())


def test_a_students_file_is_never_kept(tmp_path, reads):
    from search_spaces import build_student, preset, save_student

    save_student(build_student(preset("tiny")), tmp_path / "student")
    preflight.check_checkpoint(tmp_path / "student")
    assert reads == ["model.safetensors"] and loading._last_teacher_read is None
