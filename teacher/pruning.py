"""The pruning rules every FoundationStereo-family model shares; teacher and students add their parts.

The geometry lookup and the spatial attention mix channels (they end the coupling); the disparity and mask
heads, the convex upsampler's nine weights, the classifier's single logit, the filtered volume the geometry
lookup reads, the motion encoder's inputs and the disparity transformer's embedding (its positional table is
fixed) keep their widths.
"""

from __future__ import annotations

from torch import nn

from compress.errors import ConfigError
from compress.pruning_rules import FamilyRules, names_of

from .layers import DisparityMultiheadAttention, DisparityTransformerLayer


def last_conv(model: nn.Module, prefix: str) -> str:
    """Name of the last convolution inside the module called ``prefix``."""
    module = model.get_submodule(prefix)
    names = [n for n, m in module.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not names:
        raise ConfigError(f"{prefix} holds no convolution; this is not a FoundationStereo-family model")
    return f"{prefix}.{names[-1]}"


def family_rules(model: nn.Module, family: str, parts: dict[str, tuple[str, ...]], upsampler: str,
                 restricted: dict[str, tuple[str, ...]] | None = None, frozen: tuple[str, ...] = (),
                 correlations: tuple[str, ...] = ()) -> FamilyRules:
    """The family's shared rules for ``model``, whose convex upsampler weights come from ``upsampler``."""
    # A searched student's last up step may be a merge block (search_spaces.blocks) instead of conv_out.
    last = "cost_agg.post8_to_4" if getattr(model.cost_agg, "post8_to_4", None) is not None else "cost_agg.conv_out"
    norms = tuple(f"{n}.{norm}" for n in names_of(model, DisparityTransformerLayer) for norm in ("norm1", "norm2"))
    return FamilyRules(
        family=family,
        parts=parts,
        fixed_out=(last_conv(model, "update_block.disp_head"), last_conv(model, "update_block.mask"),
                   last_conv(model, upsampler), last_conv(model, "classifier"), last_conv(model, last), *norms),
        fixed_in=("update_block.encoder.convc1", "update_block.encoder.convd1"),
        opaque_inputs=("update_block.encoder.convc1", "sam.samconv"),
        opaque_outputs=("sam.samconv",),
        restricted=restricted or {},
        frozen=frozen,
        attention=names_of(model, DisparityMultiheadAttention),
        correlations=correlations,
    )
