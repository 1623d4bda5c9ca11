"""The teacher's state_dict matches the official layouts and loads rule-generated weights strictly."""

from __future__ import annotations

import json

import pytest
import torch

from teacher import FoundationStereo, TeacherConfig
from tests.paths import DATA as TEST_DATA
from tests.reference_weights import rule_state_dict

DATA = TEST_DATA / "reference"


def _layout(vit: str) -> dict:
    return json.loads((DATA / f"foundationstereo_{vit}_state_dict.json").read_text())


@pytest.mark.parametrize("vit", ["vits", "vitb", "vitl"])
def test_keys_order_and_shapes_match_official(vit):
    layout = _layout(vit)
    with torch.device("meta"):
        model = FoundationStereo(TeacherConfig(vit_size=vit))
    sd = model.state_dict()
    assert list(sd) == [e[0] for e in layout["entries"]]
    for key, shape, dtype in layout["entries"]:
        assert list(sd[key].shape) == shape, key
        assert str(sd[key].dtype).replace("torch.", "") == dtype, key
    assert sum(v.numel() for v in sd.values()) == layout["total_numel"]
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"]


@pytest.mark.parametrize("vit", ["vits", "vitb", "vitl"])
def test_rule_weights_load_strictly_with_aliased_batchnorm(vit):
    layout = _layout(vit)
    model = FoundationStereo(TeacherConfig(vit_size=vit))
    weights = rule_state_dict(model.state_dict())
    model.load_state_dict(weights, strict=True)
    loaded = model.state_dict()
    for norm3_key, down_key in layout["aliased_key_pairs"]:
        # One module under two names: both keys are one tensor, holding the downsample.1 values.
        assert loaded[norm3_key].data_ptr() == loaded[down_key].data_ptr()
        assert torch.equal(loaded[norm3_key], weights[down_key])
    assert len(layout["aliased_key_pairs"]) == 20
    for key in ("cnet.norm1.weight", "update_block.gru04.conv1.0.weight", "feature.stem.0.weight"):
        assert torch.equal(loaded[key], weights[key])
