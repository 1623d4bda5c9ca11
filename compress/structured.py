"""Typed YAML configs: a dataclass schema, a YAML file and ``key=value`` overrides, merged by OmegaConf."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from compress.errors import ConfigError

T = TypeVar("T")


def load_structured(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                    what: str = "recipe") -> T:
    """An instance of ``schema`` from YAML plus overrides; unknown keys and wrong types are ConfigErrors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.structured(schema)]
    where = f"{what} {path}" if path is not None else what
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{what} {path} does not exist")
            layers.append(OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        # to_object runs every dataclass __post_init__ check.
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: {'key ' + repr(key) + ': ' if key else ''}{first}") from None
    except ConfigError:
        raise
    except Exception as exc:  # YAML syntax errors surface as scanner/parser errors
        raise ConfigError(f"{where} could not be read: {exc}") from None
