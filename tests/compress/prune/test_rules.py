"""Model families declare their pruning rules; the prune stage reads the declaration and knows no model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import ConfigError
from compress.prune import analyze, prune_once, rules_for
from compress.pruning_rules import FamilyRules
from search_spaces import build_student, preset
from tests.test_layering import ROOT, project_imports


class Tiny(nn.Module):
    """A three-convolution stereo model with the family forward contract, declaring its own rules."""

    def __init__(self, fixed_out: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.fixed_out = fixed_out
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, left: torch.Tensor, right: torch.Tensor, iters: int = 2, test_mode: bool = False):
        disp = self.head(torch.relu(self.b(torch.relu(self.a(left - right)))))
        return disp if test_mode else (disp, [disp] * iters)

    def pruning_rules(self) -> FamilyRules:
        return FamilyRules(family="tiny", parts={"refinement": ("a", "b", "head")}, fixed_out=self.fixed_out)


def test_the_declared_rules_are_the_ones_coupling_uses() -> None:
    model = Tiny(fixed_out=("b",))
    assert rules_for(model).family == "tiny"
    groups = {g.root: g for g in analyze(model).groups}
    assert groups["a"].prunable and groups["a"].part == "refinement"
    assert not groups["b"].prunable and groups["b"].reason == "b keeps its output width (family rule)"
    changed = prune_once(model, 0.5, ["refinement"], round_to=2)
    assert changed == {"a": (8, 4)} and model.b.out_channels == 8 and model.b.in_channels == 4
    assert model(torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64), test_mode=True).shape == (1, 1, 32, 64)


def test_without_a_declared_rule_the_width_is_pruned() -> None:
    model = Tiny()
    changed = prune_once(model, 0.5, ["refinement"], round_to=2)
    assert changed == {"a": (8, 4), "b": (8, 4)}


def test_a_scope_the_family_does_not_declare_is_refused() -> None:
    with pytest.raises(ConfigError, match="scope backbone cannot be pruned on a tiny; its prunable parts are refinem"):
        prune_once(Tiny(), 0.5, ["backbone"])


def test_a_model_without_a_declaration_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^Sequential declares no pruning rules \(a pruning_rules\(\) method") as e:
        rules_for(nn.Sequential(nn.Conv2d(3, 8, 1)))
    assert "\n" not in str(e.value)


def test_the_student_declares_its_correlation_and_attention() -> None:
    torch.manual_seed(0)
    rules = build_student(preset("tiny")).pruning_rules()
    assert rules.family == "student" and rules.correlations == ("correlation",)
    assert rules.attention and all(name.endswith(".self_attn") for name in rules.attention)


@pytest.mark.parametrize("module", ["coupling", "trace", "importance", "step"])
def test_the_pruning_mechanism_imports_no_model(module: str) -> None:
    imports = project_imports(ROOT / "compress" / "prune" / f"{module}.py")
    assert not [(line, name) for line, name in imports if name.split(".")[0] in ("teacher", "search_spaces")]
