"""Reproduces the official FoundationStereo reference runs (rule weights, float32 CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from teacher import load_teacher
from teacher.features import normalize_image
from tests.paths import DATA as TEST_DATA
from tests.reference_weights import rule_state_dict

DATA = TEST_DATA / "reference"

# init_disp is a 104-term soft-argmin near 52 px: float32 resolves 3.8e-6 there and the reference's own
# float32 summation differs from the exact value by 2.8e-5, so 1e-4 of its std (3e-6) is below what
# float32 can reproduce; it is checked to 1e-4 px instead.
ABS_TOL = {"init_disp": 1e-4}


def _write_checkpoint(tmp_path: Path, vit: str) -> Path:
    from teacher import FoundationStereo, TeacherConfig

    cfg = {
        "vit_size": vit, "hidden_dims": [128, 128, 128], "n_gru_layers": 3, "n_downsample": 2,
        "corr_levels": 2, "corr_radius": 4, "max_disp": 416, "mixed_precision": False, "low_memory": 0,
        "valid_iters": 32, "train_iters": 22, "corr_implementation": "reg", "slow_fast_gru": False,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with torch.device("meta"):
        template = FoundationStereo(TeacherConfig(vit_size=vit)).state_dict()
    template = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.items()}
    ckpt = tmp_path / "model_best_bp2.pth"
    torch.save({"model": rule_state_dict(template), "global_step": 1}, ckpt)
    return ckpt


def _check_run(tmp_path: Path, ref_file: Path, vit: str) -> dict[str, float]:
    ref = np.load(ref_file)
    model = load_teacher(_write_checkpoint(tmp_path, vit))
    caps: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(mod, inp, out) -> None:  # keeps the first call's output, changes nothing
            caps.setdefault(name, out)

        return hook

    model.stem_2.register_forward_hook(capture("stem_2_left"))
    model.classifier.register_forward_hook(capture("classifier_logits"))
    model.feature.dino.register_forward_hook(capture("dino"))
    for lvl in ("04", "08", "16"):
        heads = getattr(model.cnet, f"outputs{lvl}")
        heads[0].register_forward_hook(capture(f"cnet{lvl}_net_raw"))
        heads[1].register_forward_hook(capture(f"cnet{lvl}_inp_raw"))
    left, right = torch.from_numpy(ref["left"]), torch.from_numpy(ref["right"])
    with torch.no_grad():
        disp = model(left, right, iters=int(ref["iters"]), test_mode=True)
        out = model(left, right, iters=int(ref["iters"]), return_intermediates=True)
    assert torch.equal(disp, out.disp)
    got = {
        "init_disp": out.init_disp,
        "disp_preds": torch.stack(out.disp_preds),
        "stem_2_left": caps["stem_2_left"],
        "classifier_logits": caps["classifier_logits"],
        # The reference stores both views' ViT features; the model keeps the left one.
        "vit_feat": torch.cat([out.vit_feat, model.feature.vit_feature(normalize_image(right))[0]]),
    }
    for i, lvl in enumerate(("4", "8", "16", "32")):
        got[f"feat{lvl}_left"] = out.features_left[i]
        got[f"feat{lvl}_right"] = out.features_right[i]
    for i in range(4):
        got[f"dino_interm{i}_tokens"] = caps["dino"][1][i]
    for lvl in ("04", "08", "16"):
        got[f"cnet{lvl}_net_raw"] = caps[f"cnet{lvl}_net_raw"]
        got[f"cnet{lvl}_inp_raw"] = caps[f"cnet{lvl}_inp_raw"]

    disp_err = float(np.abs(disp.numpy() - ref["disp"]).max())
    assert disp_err < 1e-3, f"final disparity differs by {disp_err} px"
    errors = {"disp": disp_err}
    for name, value in got.items():
        expected = ref[name]
        assert tuple(value.shape) == expected.shape, name
        err = float(np.abs(value.detach().numpy() - expected).max())
        tol = ABS_TOL.get(name, 1e-4 * float(expected.std()))
        assert err <= tol, f"{name}: max abs diff {err:.3e} above {tol:.3e}"
        errors[name] = err
    return errors


def test_vits_reference_run_reproduces(tmp_path):
    _check_run(tmp_path, DATA / "foundationstereo_vits_reference.npz", "vits")


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(os.environ.get("FFSC_REFERENCE_DIR", "/nonexistent")) / "foundationstereo_vitl_reference.npz").is_file(),
    reason="the vitl reference run is too large to ship; set FFSC_REFERENCE_DIR to a folder holding it",
)
def test_vitl_reference_run_reproduces(tmp_path):
    ref_dir = Path(os.environ["FFSC_REFERENCE_DIR"])
    errors = _check_run(tmp_path, ref_dir / "foundationstereo_vitl_reference.npz", "vitl")
    print({k: f"{v:.2e}" for k, v in errors.items()})
