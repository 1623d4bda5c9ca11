"""One model reference: a recipe's ``student.model`` takes every ``--model`` value that makes sense for training,
through the same resolver (``resolve_model``); the old key ``student.init_checkpoint`` fails in one line and old
records still read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compress.distill.config import load_recipe
from compress.errors import CheckpointError, ConfigError
from compress.models import StudentSpec, resolve_model, save_distilled_student, student_from_spec
from search_spaces import StudentStereo, build_student, preset, save_student
from search_spaces.serialization import save_pruned_teacher
from teacher import FoundationStereo, TeacherConfig
from tests.stereo_toy import ToyStereo, make_toy

RECIPE = ["teacher.stand_in=random", "teacher.config.vit_size=vitt"]  # a distill recipe needs a teacher
TINY_TEACHER = dict(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, mixed_precision=False, valid_iters=3)
TOY = "tests.stereo_toy:make_toy"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One model of each form a training run may start from, written as the commands write them."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    save_student(build_student(preset("tiny"), pretrained=False), root / "student")
    torch.manual_seed(2)
    teacher = FoundationStereo(TeacherConfig(**TINY_TEACHER))
    torch.save({"model": teacher.state_dict()}, root / "teacher.pth")
    TeacherConfig(**TINY_TEACHER).to_yaml(root / "cfg.yaml")
    save_pruned_teacher(teacher, root / "pruned")
    save_distilled_student(make_toy(seed=3), StudentSpec(kind="factory", factory=TOY), root / "run" / "student.pt")
    (root / "model.onnx").write_bytes(b"not used")
    return {"student": root / "student", "teacher": root / "teacher.pth", "pruned": root / "pruned",
            "distilled": root / "run" / "student.pt", "onnx": root / "model.onnx"}


def _student(*overrides: str) -> nn.Module:
    cfg = load_recipe(None, [*RECIPE, *overrides])
    return student_from_spec(cfg.student, seed=cfg.seed)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("form, value, kind, cls", [
    ("saved student folder", "student", "search_space", StudentStereo),
    ("pruned teacher folder", "pruned", "foundation_stereo", FoundationStereo),
    ("teacher checkpoint", "teacher", "foundation_stereo", FoundationStereo),
    ("preset name", "tiny", "search_space", StudentStereo),
    ("preset:NAME", "preset:tiny", "search_space", StudentStereo),
    ("random teacher", "teacher:vitt", "foundation_stereo", FoundationStereo),
])
def test_student_model_is_the_model_that_model_names(models, form: str, value: str, kind: str, cls: type) -> None:
    value = str(models.get(value, value))
    student = _student(f"student.kind={kind}", f"student.model={value}")
    assert isinstance(student, cls), form
    assert _same_weights(student, resolve_model(value).module), form  # the --model resolver, the same words
    # A student to train, not a frozen teacher: only FoundationStereo's own frozen DINO backbone is left out.
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    assert all(".dino." in name for name in frozen), form
    assert len(frozen) < len(list(student.parameters())), form


def test_a_distilled_file_initialises_the_architecture_its_factory_builds(models) -> None:
    student = _student("student.kind=factory", f"student.factory={TOY}", f"student.model={models['distilled']}")
    assert isinstance(student, ToyStereo)
    assert _same_weights(student, make_toy(seed=3))  # the file's weights, not the factory's seed-0 ones
    assert not _same_weights(student, make_toy(seed=0))


def test_a_model_beside_a_preset_gives_its_weights_to_that_architecture(models) -> None:
    folder = str(models["student"])
    student = _student("student.preset=tiny", f"student.model={folder}")
    assert _same_weights(student, resolve_model(folder).module)
    with pytest.raises(CheckpointError, match="student.model") as err:  # the architectures differ
        _student("student.preset=small", f"student.model={folder}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, error, message", [
    (["student.model={pruned}"], ConfigError, "set student.kind=foundation_stereo"),
    (["student.kind=foundation_stereo", "student.model={student}"], ConfigError, "set student.kind=search_space"),
    (["student.model={onnx}"], CheckpointError, "student.model .*unsupported file type '.onnx'"),
    (["student.model=no_such_preset"], ConfigError, "student.model 'no_such_preset' is not .*tiny"),
    (["student.model=runs/missing"], CheckpointError, "student.model runs/missing: no such file or directory"),
])
def test_a_model_that_cannot_be_the_student_fails_in_one_line(models, overrides, error, message) -> None:
    paths = {name: str(path) for name, path in models.items()}
    with pytest.raises(error, match=message) as err:
        _student(*(o.format(**paths) for o in overrides))
    assert "\n" not in str(err.value)


def test_the_old_key_fails_in_one_line_naming_the_new_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'student.init_checkpoint' was renamed to 'student.model'") as err:
        load_recipe(None, [*RECIPE, "student.init_checkpoint=runs/imported"])
    assert "\n" not in str(err.value)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("student:\n  kind: search_space\n  init_checkpoint: runs/imported\n")
    with pytest.raises(ConfigError, match="'student.init_checkpoint' was renamed to 'student.model'"):
        load_recipe(recipe, RECIPE)


def test_a_student_file_written_before_the_rename_still_loads(models, tmp_path: Path) -> None:
    state = torch.load(models["distilled"], weights_only=True)
    state["spec"]["init_checkpoint"] = state["spec"].pop("model")  # as save_distilled_student wrote it before
    old = tmp_path / "student.pt"
    torch.save(state, old)
    assert _same_weights(resolve_model(old).module, make_toy(seed=3))
