"""Search spaces over StudentConfig, defined in YAML; Optuna trials sample valid configs from them.

A space can also be laid over a trained *parent* of the family (:meth:`SearchSpace.over_parent`): the parent's
config becomes the base, every choice must be one the parent can supply (no wider, deeper, finer or longer than
it), and the search looks at the parent's sub-networks. :func:`subnet_space` derives such a space from the parent
alone (each width at 1, 3/4 and 1/2 of the parent's, shallower stages, fewer iterations).

A space file has a ``base`` (a preset name) that fixes every field not searched, ``dimensions`` (each a
StudentConfig field with ``choices``, an integer ``range`` with ``step``, or a fixed ``value``), and
``constraints``. ``hourglass_widths`` is searched as ``multipliers`` of ``volume_dim``. Two repairs keep
every sample valid: ``hourglass_levels`` and ``gru_levels`` are capped at what the volume resolution
allows (2 at a 1/8 volume), and hourglass widths are truncated to the sampled number of levels.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from compress.errors import ConfigError
from compress.structured import did_you_mean, read_yaml

from .config import StudentConfig
from .model import build_student
from .presets import preset

_WIDTH_FIELDS = ("feature_dim", "concat_dim", "volume_dim", "hidden_dim", "motion_dim", "motion_corr_dim",
                 "motion_disp_dim", "hourglass_widths", "backbone_dims")
# Dimensions whose values interact through the repairs above; enumerated together to count the space.
_COUPLED = ("volume_scale", "hourglass_levels", "hourglass_widths", "volume_dim", "gru_levels")


@dataclass
class Dimension:
    """One searched field: categorical ``choices`` or an integer range."""

    name: str
    choices: list[Any] | None = None
    low: int | None = None
    high: int | None = None
    step: int = 1
    multipliers: bool = False  # hourglass_widths given as multipliers of volume_dim

    def values(self) -> list[Any]:
        """Every value this dimension can take."""
        if self.choices is not None:
            return list(self.choices)
        return list(range(self.low, self.high + 1, self.step))

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial (or anything with suggest_* methods) for a value."""
        if self.choices is not None:
            # Optuna categoricals hold scalars only: lists travel as comma-joined strings.
            encoded = [_encode(c) for c in self.choices]
            return _decode(trial.suggest_categorical(self.name, encoded))
        return trial.suggest_int(self.name, self.low, self.high, step=self.step)


def _encode(value: Any) -> Any:
    return ",".join(str(v) for v in value) if isinstance(value, list | tuple) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        return [float(v) if "." in v else int(v) for v in value.split(",")]
    return value


@dataclass
class SearchSpace:
    """A named set of dimensions over a base preset, with constraints."""

    name: str
    base: str
    dimensions: list[Dimension]
    channel_multiple: int = 8
    base_overrides: dict[str, Any] = field(default_factory=dict)
    base_config: StudentConfig | None = None
    """A trained parent's config (see :meth:`over_parent`): the base instead of the preset."""

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Read and validate a search-space file."""
        return cls.from_dict(read_yaml(path, "search space"), source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> SearchSpace:
        """Build from parsed YAML, checking every dimension against StudentConfig."""
        if not isinstance(data, dict) or "dimensions" not in data:
            raise ConfigError(f"search space {source}: expected a mapping with 'dimensions'")
        known = {f.name for f in fields(StudentConfig)}
        dims = []
        for name, spec in (data.get("dimensions") or {}).items():
            if name not in known:
                raise ConfigError(f"search space {source}: dimension {name!r} is not a StudentConfig field"
                                  f"{did_you_mean(name, known)}")
            if not isinstance(spec, dict):
                raise ConfigError(f"search space {source}: dimension {name!r} needs choices, range or value")
            multipliers = name == "hourglass_widths"
            if multipliers:
                spec = spec.get("multipliers", spec)
            if "value" in spec:
                dims.append(Dimension(name, choices=[spec["value"]], multipliers=multipliers))
            elif "choices" in spec:
                if not spec["choices"]:
                    raise ConfigError(f"search space {source}: dimension {name!r} has no choices")
                dims.append(Dimension(name, choices=list(spec["choices"]), multipliers=multipliers))
            elif "range" in spec:
                low, high = spec["range"]
                dims.append(Dimension(name, low=int(low), high=int(high), step=int(spec.get("step", 1))))
            else:
                raise ConfigError(f"search space {source}: dimension {name!r} needs choices, range or value")
        constraints = data.get("constraints") or {}
        space = cls(
            name=str(data.get("name", Path(source).stem)),
            base=str(data.get("base", "fast_foundationstereo")),
            dimensions=dims,
            channel_multiple=int(constraints.get("channel_multiple", 8)),
            base_overrides=dict(data.get("base_overrides") or {}),
        )
        space.check(source)
        return space

    def check(self, source: str) -> None:
        """Static constraints: searched widths are multiples of channel_multiple, groups divide widths."""
        m = self.channel_multiple
        base = self._base()
        for dim in self.dimensions:
            if dim.name in _WIDTH_FIELDS and not dim.multipliers:
                for v in dim.values():
                    vals = v if isinstance(v, list) else [v]
                    bad = [x for x in vals if x % m and x != 0]
                    if bad and dim.name != "backbone_dims":
                        raise ConfigError(
                            f"search space {source}: {dim.name} choice {v} is not a multiple of {m} "
                            "(tensor cores want channel counts in multiples of 8)"
                        )
        widths = self._values("feature_dim", base)
        for g in self._values("cv_groups", base):
            for w in widths:
                if w % g:
                    raise ConfigError(f"search space {source}: cv_groups {g} does not divide feature_dim {w}")
        for h in self._values("transformer_heads", base):
            for v in self._values("volume_dim", base):
                if v % h:
                    raise ConfigError(f"search space {source}: transformer_heads {h} does not divide volume_dim {v}")

    def _base(self) -> StudentConfig:
        if self.base_config is not None:
            return self.base_config
        return preset(self.base, **self.base_overrides)

    # --- sub-networks of a trained parent ---------------------------------------------------------
    def over_parent(self, parent: StudentConfig, parent_name: str = "the parent") -> SearchSpace:
        """This space's dimensions over ``parent``'s config: every choice must be one the parent can supply.

        A choice wider, deeper, longer or finer than the parent (or a categorical value it does not have) is a
        ConfigError naming the dimension, the choice and the parent's value, before any work.
        """
        space = dataclasses.replace(self, base_config=parent.replace(name=f"{self.name}-base"), base_overrides={})
        problems = []
        for dim in self.dimensions:
            for value in dim.values():
                values = {dim.name: value}
                if dim.name == "hourglass_widths":  # multipliers: widest at the largest volume_dim searched
                    values["volume_dim"] = max(space._values("volume_dim", parent))
                cfg = space.config_from_values(values)
                for name in _SUPPLIED if dim.name in _SUPPLIED else (dim.name,):
                    have, need = getattr(parent, name), getattr(cfg, name)
                    if not (_can_supply(have, need, name) if name in _SUPPLIED else have == need):
                        problems.append(f"{dim.name}={_encode(value)} needs {name} {getattr(cfg, name)}, "
                                        f"{parent_name} has {getattr(parent, name)}")
                        break
        if problems:
            raise ConfigError(f"search space {self.name!r} over {parent_name}: {len(problems)} choice(s) it cannot "
                              f"supply: {'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}. Narrow the "
                              "space to the parent's sub-networks, or use search.space=subnets")
        space.check(f"{self.name} over {parent_name}")
        return space

    def _values(self, name: str, base: StudentConfig) -> list[Any]:
        for dim in self.dimensions:
            if dim.name == name:
                return dim.values()
        return [getattr(base, name)]

    # --- sampling --------------------------------------------------------------------------------
    def config_from_values(self, values: dict[str, Any]) -> StudentConfig:
        """The StudentConfig for one assignment of the dimensions (repairs applied)."""
        base = self._base()
        data = base.to_dict()
        data.update({k: v for k, v in values.items() if k != "hourglass_widths"})
        scale = data["volume_scale"]
        cap = 3 if scale == 4 else 2
        data["hourglass_levels"] = min(int(data["hourglass_levels"]), cap)
        data["gru_levels"] = min(int(data["gru_levels"]), cap)
        levels = data["hourglass_levels"]
        if "hourglass_widths" in values:
            mults = values["hourglass_widths"]
            m = self.channel_multiple
            data["hourglass_widths"] = [max(m, int(round(x * data["volume_dim"] / m)) * m) for x in mults[:levels]]
        else:
            widths = list(base.hourglass_widths)
            while len(widths) < levels:
                widths.append(widths[-1] + (widths[-1] - (widths[-2] if len(widths) > 1 else data["volume_dim"])))
            data["hourglass_widths"] = widths[:levels]
        data["name"] = f"{self.name}-sample"
        data["layer_shapes"] = {}
        return StudentConfig.from_dict(data)

    def sample(self, trial) -> StudentConfig:
        """Turn an Optuna trial into a valid StudentConfig."""
        values = {dim.name: dim.suggest(trial) for dim in self.dimensions}
        return self.config_from_values(values)

    def enumerate(self, limit: int | None = None):
        """Yield distinct configs (all of them, or the first ``limit``)."""
        seen = set()
        names = [d.name for d in self.dimensions]
        for combo in itertools.product(*(d.values() for d in self.dimensions)):
            cfg = self.config_from_values(dict(zip(names, combo, strict=True)))
            key = cfg.to_json()
            if key in seen:
                continue
            seen.add(key)
            yield cfg
            if limit is not None and len(seen) >= limit:
                return

    def size(self) -> int:
        """Number of distinct valid configs: the coupled dimensions enumerated, the rest multiplied."""
        coupled = [d for d in self.dimensions if d.name in _COUPLED]
        free = [d for d in self.dimensions if d.name not in _COUPLED]
        names = [d.name for d in coupled]
        distinct = set()
        for combo in itertools.product(*(d.values() for d in coupled)):
            cfg = self.config_from_values(dict(zip(names, combo, strict=True)))
            distinct.add(tuple(_encode(getattr(cfg, n)) for n in _COUPLED))
        return len(distinct) * math.prod(len(d.values()) for d in free)

    def describe(self) -> list[tuple[str, str]]:
        """(dimension, its values) rows for display."""
        rows = []
        for d in self.dimensions:
            if d.choices is not None:
                vals = ", ".join(str(_encode(c)).replace(",", "/") for c in d.choices)
                label = f"{d.name} (x volume_dim)" if d.multipliers else d.name
                rows.append((label, vals))
            else:
                rows.append((d.name, f"{d.low}..{d.high} step {d.step}"))
        return rows


_SUPPLIED = ("backbone_dims", "backbone_depths", "feature_dim", "concat_dim", "volume_dim", "hourglass_levels",
             "hourglass_widths", "transformer_layers", "gru_levels", "hidden_dim", "motion_dim", "motion_corr_dim",
             "motion_disp_dim", "corr_radius", "corr_levels", "iters", "max_disp", "volume_scale", "stem_blocks",
             "agg_blocks", "head_blocks", "cv_groups", "transformer_heads", "classifier_kernel")
"""Fields a sub-network may shrink (never grow) relative to its parent; other searched fields must match it."""


def _can_supply(parent: Any, child: Any, name: str) -> bool:
    """Whether a parent with value ``parent`` contains a sub-network with value ``child`` for field ``name``."""
    if name == "volume_scale":  # a coarser volume (larger scale) is the smaller network
        return child >= parent
    if isinstance(parent, list | tuple) or isinstance(child, list | tuple):
        p, c = list(parent), list(child)
        return len(c) <= len(p) and all(ci <= pi for ci, pi in zip(c, p, strict=False))
    if isinstance(parent, bool) or not isinstance(parent, int | float):
        return child == parent
    return child <= parent


def _shrunk(value: int, fraction: float, multiple: int) -> int:
    return max(multiple, int(round(value * fraction / multiple)) * multiple)


def subnet_space(parent: StudentConfig, name: str = "subnets", fractions: tuple[float, ...] = (1.0, 0.75, 0.5),
                 channel_multiple: int = 8) -> SearchSpace:
    """The sub-networks of a trained parent: widths at ``fractions`` of the parent's, shallower and fewer."""
    base = parent.replace(name=f"{name}-base")
    m = channel_multiple

    def widths(field_name: str, multiple: int = m) -> Dimension | None:
        value = getattr(parent, field_name)
        if value % multiple:  # an imported release's odd width: keep it, the parent supplies only itself
            return None
        choices = sorted({min(value, _shrunk(value, f, multiple)) for f in fractions}, reverse=True)
        return Dimension(field_name, choices=choices) if len(choices) > 1 else None

    dims: list[Dimension] = []
    groups = math.lcm(m, parent.cv_groups)
    for field_name, multiple in (("feature_dim", groups), ("volume_dim", math.lcm(m, parent.transformer_heads)),
                                 ("hidden_dim", math.lcm(m, 16)), ("motion_dim", m), ("motion_corr_dim", m)):
        if (dim := widths(field_name, multiple)) is not None:
            dims.append(dim)
    if all(d % 8 == 0 for d in parent.backbone_dims):
        scaled = [[_shrunk(d, f, 8) for d in parent.backbone_dims] for f in fractions]
        dims.append(Dimension("backbone_dims", choices=[s for i, s in enumerate(scaled) if s not in scaled[:i]]))
    shallower = [max(1, d - 1) for d in parent.backbone_depths]
    if shallower != list(parent.backbone_depths):
        dims.append(Dimension("backbone_depths", choices=[list(parent.backbone_depths), shallower]))
    if parent.max_disp > 32:  # a shallower volume: the deployment's disparity range decides (multiples of 32)
        depths = {min(parent.max_disp, max(32, math.ceil(parent.max_disp * f / 32) * 32)) for f in fractions}
        dims.append(Dimension("max_disp", choices=sorted(depths, reverse=True)))
    if parent.volume_scale == 4:
        dims.append(Dimension("volume_scale", choices=[4, 8]))
    if parent.hourglass_levels > 1:
        dims.append(Dimension("hourglass_levels", choices=[parent.hourglass_levels, parent.hourglass_levels - 1]))
    if parent.iters > 1:
        iters = {parent.iters, max(1, (2 * parent.iters) // 3), max(1, parent.iters // 2), max(1, parent.iters // 3)}
        dims.append(Dimension("iters", choices=sorted(iters, reverse=True)))
    if parent.corr_radius > 1:
        dims.append(Dimension("corr_radius", choices=[parent.corr_radius, parent.corr_radius - 1]))
    if parent.transformer_layers > 0:
        dims.append(Dimension("transformer_layers", choices=[parent.transformer_layers, 0]))
    if parent.concat_dim > 0:
        dims.append(Dimension("concat_dim", choices=[parent.concat_dim, 0]))
    if parent.gru_levels > 1:
        dims.append(Dimension("gru_levels", choices=list(range(parent.gru_levels, 0, -1))))
    if parent.volume_blocks:  # a release's searched cost-volume blocks have fixed widths and levels: keep the stage
        dims = [d for d in dims if d.name not in _VOLUME_STAGE]
    space = SearchSpace(name=name, base=parent.name, dimensions=dims, channel_multiple=m, base_config=base)
    for dim in dims:  # a value the family cannot build at all (e.g. a width its attention cannot split) is dropped
        dim.choices = [v for v in dim.choices if _builds(space, {dim.name: v})]
    space.dimensions = [d for d in dims if len(d.choices) > 1]
    space.check(f"{name} of {parent.name}")
    return space


_VOLUME_STAGE = ("feature_dim", "volume_dim", "hourglass_levels", "volume_scale", "concat_dim", "max_disp",
                 "transformer_layers")
"""Fields that shape the cost-volume stages, whose searched block variants (``volume_blocks``) fix their widths."""


def _builds(space: SearchSpace, values: dict[str, Any]) -> bool:
    """Whether the family builds the config (on the meta device: shapes only), e.g. a release's searched blocks."""
    try:
        cfg = space.config_from_values(values)
        if cfg.volume_blocks:  # the config's checks cover the family's own blocks; a release's searched ones run
            with torch.device("meta"):
                model = build_student(cfg, pretrained=False).eval()
                pair = torch.empty(1, 3, 64, 128)
                model(pair, pair, iters=1, test_mode=True)  # shapes only: a block that cannot take its input fails
    except (ConfigError, RuntimeError, ValueError):
        return False
    return True


SUBNETS = "subnets"
"""The space name that means "the sub-networks of the search's parent" (:func:`subnet_space`)."""


def load_space(name_or_path: str | Path, parent: StudentConfig | None = None, parent_name: str = "the parent",
               ) -> SearchSpace:
    """A shipped space by name (``tiny``, ``fast_foundationstereo``) or any YAML file; over ``parent`` if given."""
    if str(name_or_path) == SUBNETS:
        if parent is None:
            raise ConfigError(f"search space {SUBNETS!r} is the sub-networks of a trained parent; name one "
                              "(search.parent) or pick a space: " + ", ".join(shipped_spaces()))
        return subnet_space(parent)
    space = _load_space_file(name_or_path)
    return space if parent is None else space.over_parent(parent, parent_name)


def shipped_spaces() -> list[str]:
    """Names of the spaces shipped with the package, and ``subnets``."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.yaml")) + [SUBNETS]


def _load_space_file(name_or_path: str | Path) -> SearchSpace:
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(__file__).parent / f"{name_or_path}.yaml"
        if not path.is_file():
            known = shipped_spaces()
            raise ConfigError(f"unknown search space {str(name_or_path)!r}{did_you_mean(str(name_or_path), known)} "
                              f"(shipped: {', '.join(known)}; or the path of a space .yaml file)")
    return SearchSpace.from_yaml(path)
