"""One rule for every model's GRU iterations (``teacher.model_iters``): its own cfg.iters, an explicit count wins."""

from __future__ import annotations

import pytest
from torch import nn

from compress.errors import ConfigError
from search_spaces import build_student, count_macs, preset
from teacher import FoundationStereo, TeacherConfig, model_iters


def test_every_model_answers_its_own_count_and_an_override_wins() -> None:
    student = build_student(preset("tiny", iters=3))
    with_meta = TeacherConfig(vit_size="vitt", hidden_dims=[32, 32, 32], max_disp=64, valid_iters=5)
    teacher = FoundationStereo(with_meta)
    assert model_iters(student) == 3
    assert model_iters(teacher) == 5  # the official config's valid_iters
    assert model_iters(teacher, 2) == 2
    # MACs are counted at the same count when none is given: 5 iterations cost more than 2.
    assert count_macs(teacher, 64, 128).macs > count_macs(teacher, 64, 128, iters=2).macs


def test_a_model_without_a_count_or_a_bad_override_is_one_line() -> None:
    with pytest.raises(ConfigError, match="Conv2d does not say how many GRU iterations.*give --iters"):
        model_iters(nn.Conv2d(3, 3, 1), key="--iters")
    with pytest.raises(ConfigError, match="teacher.iters: got 0, expected >= 1"):
        model_iters(build_student(preset("tiny")), 0, key="teacher.iters")


def test_no_numeric_iteration_fallback_is_left_in_the_library() -> None:
    """The fallbacks that once disagreed (8 in three places, 32 in two) are gone: every one goes through model_iters."""
    import re

    from tests.paths import REPO

    pattern = re.compile(r"iters\b.*\bor\s+(8|32)\b|getattr\([^)]*\"iters\",\s*\d+\)")
    # Code only: a comment may tell the story of the old fallbacks.
    found = [f"{path.relative_to(REPO)}:{n}" for folder in ("compress", "teacher", "search_spaces")
             for path in (REPO / folder).rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line.split("#")[0])]
    assert found == []
