"""Named student configurations: the published Fast-FoundationStereo shape and smaller ones."""

from __future__ import annotations

from compress.errors import ConfigError

from .config import StudentConfig

PRESETS: dict[str, dict] = {
    # Fast-FoundationStereo as its repository builds it before NAS and pruning (~20M parameters).
    "ffs_unpruned": dict(),
    # Shaped like the released Fast-FoundationStereo model: EdgeNeXt-S, 1/4 volume, one GRU level, 8 iterations,
    # slimmer cost filtering (what the blockwise NAS chose) and a pruned refinement (14.3M parameters,
    # 359 GMACs at 480x640 with 8 iterations).
    "fast_foundationstereo": dict(
        volume_dim=24, hourglass_widths=[48, 96, 144], stem_blocks=1, agg_blocks=1,
        hidden_dim=64, motion_dim=64, motion_corr_dim=96, motion_disp_dim=32, head_blocks=1,
    ),
    # EdgeNeXt-XS backbone, narrower everything, 6 iterations.
    "small": dict(
        backbone_dims=[32, 64, 100, 192], backbone_heads=4, feature_dim=96, volume_dim=16,
        hourglass_widths=[32, 64, 96], stem_blocks=1, agg_blocks=1, transformer_layers=2, hidden_dim=48,
        motion_dim=48, motion_corr_dim=64, motion_disp_dim=32, head_blocks=1, iters=6,
    ),
    # 1/8 cost volume, two hourglass levels: the cheapest real-time shape.
    "small_eighth": dict(
        backbone_dims=[32, 64, 100, 192], backbone_heads=4, feature_dim=96, volume_scale=8, volume_dim=16,
        hourglass_levels=2, hourglass_widths=[32, 64], stem_blocks=1, agg_blocks=1, transformer_layers=2, hidden_dim=48,
        motion_dim=48, motion_corr_dim=64, motion_disp_dim=32, head_blocks=1, iters=6,
    ),
    # For tests and the CPU quick start: seconds to train, milliseconds to run at 64x128.
    "tiny": dict(
        backbone_dims=[16, 32, 48, 64], backbone_depths=[1, 1, 2, 1], backbone_heads=4, feature_dim=32, max_disp=64,
        cv_groups=4, concat_dim=8, volume_dim=8, hourglass_levels=2, hourglass_widths=[16, 24], stem_blocks=1,
        apc_kernel=5, agg_blocks=1, transformer_layers=1, transformer_heads=2, hidden_dim=32, motion_dim=32,
        motion_corr_dim=32, motion_disp_dim=16, head_blocks=1, corr_levels=2, corr_radius=2, iters=4,
        mixed_precision=False,
    ),
    # The stand-in teacher of the CPU quick start (trained on synthetic ground truth when no official
    # checkpoint is given): wider than anything in the tiny space, still seconds per training step.
    "quickstart_teacher": dict(
        backbone_dims=[24, 48, 64, 96], backbone_depths=[1, 1, 2, 1], backbone_heads=4, feature_dim=48,
        max_disp=64, cv_groups=8, concat_dim=16, volume_dim=16, hourglass_levels=2, hourglass_widths=[32, 48],
        stem_blocks=1, apc_kernel=5, agg_blocks=1, transformer_layers=1, transformer_heads=2, hidden_dim=48,
        motion_dim=48, motion_corr_dim=64, motion_disp_dim=16, head_blocks=1, corr_levels=2, corr_radius=2,
        iters=6, mixed_precision=False,
    ),
}


# The shipped stand-in teacher (teacher/standin/): the quick start's teacher with a cost volume deep
# enough for disparities up to 128 px at 256x320 (40 bins at 1/4 resolution cover 160 px).
PRESETS["standin_teacher"] = dict(PRESETS["quickstart_teacher"], max_disp=160)


def preset(name: str, **overrides) -> StudentConfig:
    """The StudentConfig of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown student preset {name!r}; available: {', '.join(PRESETS)}")
    return StudentConfig(name=name, **{**PRESETS[name], **overrides})
