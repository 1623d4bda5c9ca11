"""Typed YAML configs: a dataclass schema, a YAML file and ``key=value`` overrides, merged by OmegaConf.

The one place configs are read and written: ``load_structured`` (recipes), ``read_yaml`` (one YAML mapping,
for configs that are not OmegaConf schemas), ``check_keys`` (unknown keys, with "did you mean") and
``to_plain`` / ``dump_yaml`` (dataclasses to YAML-ready data). A schema lists the keys it renamed in a ``RENAMED``
class variable (old key -> new key, both dotted from the schema); an old key in a file or an override fails with
one line naming the new one (``check_renamed``), and a record written before the rename reads in today's keys
(``translate_renamed``). It depends on compress.errors and compress.atomic
only, so that teacher/ and search_spaces/ use it as they use compress.errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from compress.atomic import atomic_write_text
from compress.errors import ConfigError

T = TypeVar("T")


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known key, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(schema: type, data: Mapping[str, Any], what: str) -> None:
    """Raise a ConfigError naming the first key of ``data`` that ``schema`` (a dataclass) has no field for."""
    names = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(unknown)}{did_you_mean(unknown[0], names)}")


def read_yaml(path: str | Path, what: str, missing_hint: str = "") -> dict[str, Any]:
    """The mapping a YAML (or JSON) file holds; a missing file, bad YAML or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist{missing_hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} should be a YAML mapping, got {type(data).__name__}")
    return data


def to_plain(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, recursively: data that yaml.safe_dump and JSON accept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def dump_yaml(config: Any, path: str | Path, sort_keys: bool = False) -> None:
    """Write a config (dataclass or mapping) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_plain(config), sort_keys=sort_keys))


def _nested(schema: type) -> dict[str, type]:
    """The fields of a dataclass schema that are themselves dataclasses (optional ones included)."""
    out = {}
    for name, hint in typing.get_type_hints(schema).items():
        hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if dataclasses.is_dataclass(hint):
            out[name] = hint
    return out


def renamed_keys(schema: type, prefix: str = "") -> dict[str, str]:
    """Every renamed key of a schema and of the schemas nested in it: dotted old key -> dotted new key."""
    out = {prefix + old: prefix + new for old, new in getattr(schema, "RENAMED", {}).items()}
    for name, sub in _nested(schema).items():
        out.update(renamed_keys(sub, f"{prefix}{name}."))
    return out


def _dotted_items(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        yield f"{prefix}{key}", value
        if isinstance(value, Mapping):
            yield from _dotted_items(value, f"{prefix}{key}.")


def flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config's leaves under dotted keys (an empty mapping is a leaf), the form translate_renamed reads."""
    return {key: value for key, value in _dotted_items(data) if not isinstance(value, Mapping) or not value}


def _dotted_keys(data: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    return (key for key, _ in _dotted_items(data, prefix))


def _sections(data: Mapping[str, Any]) -> set[str]:
    """The dotted keys of ``data`` whose value is a mapping."""
    return {key for key, value in _dotted_items(data) if isinstance(value, Mapping)}


def check_renamed(schema: type, keys: Iterable[str], where: str, sections: Iterable[str] = ()) -> None:
    """Raise a ConfigError for the first key in ``keys`` (dotted) that ``schema`` renamed, naming the new key.

    A key that became a section of its own name (``teacher`` -> ``teacher.checkpoint``) is the old key only where
    its value is not a mapping: ``sections`` lists the keys given a mapping."""
    renamed, sections = renamed_keys(schema), set(sections)
    for key in keys:
        if key in renamed and not (key in sections and renamed[key].startswith(key + ".")):
            raise ConfigError(f"{where}: key {key!r} was renamed to {renamed[key]!r}")


def translate_renamed(schema: type, flat: Mapping[str, Any]) -> dict[str, Any]:
    """A record's dotted keys (a config written before keys were renamed) in today's names.

    Each key under a renamed key (the longest one) moves under its new key; a renamed flag written as
    ``new.key=value`` becomes that value where it was true; a key renamed into several is dropped. A new key
    recorded beside its old one wins."""
    renamed = renamed_keys(schema)
    kept: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in flat.items():
        old = max((old for old in renamed if _under(key, old)), key=len, default=None)
        new = renamed.get(old, "")
        if old is None or (key != old and _under(new, old)):  # not renamed, or already inside the new section
            kept[key] = value
        elif "=" in new:
            if key == old and value is True:
                new_key, new_value = new.split("=", 1)
                moved[new_key] = yaml.safe_load(new_value)
        elif "," not in new and " " not in new:
            moved[new + key[len(old):]] = value
    return {**moved, **kept}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _suggest(schema: type, key: str) -> str:
    """A "did you mean" for an unknown dotted key: a close field name, or the same name one level down."""
    *parents, leaf = key.split(".")
    for part in parents:
        schema = _nested(schema).get(part)
        if schema is None:
            return ""
    close = did_you_mean(leaf, (f.name for f in dataclasses.fields(schema)))
    moved = [f"{'.'.join([*parents, name, leaf])}" for name, sub in _nested(schema).items()
             if leaf in {f.name for f in dataclasses.fields(sub)}]
    return close or (f"; did you mean {moved[0]!r}?" if moved else "")


def load_record(schema: type[T], path: str | Path, what: str = "recorded config") -> T:
    """A config this package wrote (``dump_yaml``), read in today's keys even when written before a rename."""
    nested: dict[str, Any] = {}
    for key, value in translate_renamed(schema, flatten(read_yaml(path, what))).items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(nested)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{what} {path}: {str(exc).splitlines()[0]}") from None


def load_structured(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                    what: str = "recipe") -> T:
    """An instance of ``schema`` from YAML plus overrides; unknown, renamed keys and wrong types are ConfigErrors."""
    layers = [OmegaConf.structured(schema)]
    where = f"{what} {path}" if path is not None else what
    try:
        if path is not None:
            path = Path(path)
            if path.is_dir():
                raise ConfigError(f"{what} {path} is a folder; expected a YAML file")
            if not path.is_file():
                raise ConfigError(f"{what} {path} does not exist")
            layers.append(OmegaConf.load(path))
            plain = OmegaConf.to_container(layers[-1])
            if not plain:  # an empty file (or comments only) would silently run every default
                raise ConfigError(f"{what} {path} is empty; expected YAML settings (key: value lines)")
            if isinstance(plain, Mapping):
                check_renamed(schema, _dotted_keys(plain), where, _sections(plain))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
            plain = OmegaConf.to_container(layers[-1])
            sections = _sections(plain) if isinstance(plain, Mapping) else set()
            check_renamed(schema, (o.split("=", 1)[0].lstrip("+~") for o in overrides), "override", sections)
            if isinstance(plain, Mapping):  # a mapping value's keys too
                check_renamed(schema, _dotted_keys(plain), "override", sections)
        # to_object runs every dataclass __post_init__ check.
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if key and isinstance(exc, ConfigKeyError) and "did you mean" not in first.lower():
            first += _suggest(schema, key)  # OmegaConf < 2.4 does not suggest; none suggests a nested key
        raise ConfigError(f"{where}: {'key ' + repr(key) + ': ' if key else ''}{first}") from None
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as exc:  # a syntax error: where it is, in the editor's 1-based numbering
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {exc.problem or exc.context}") from None
    except Exception as exc:  # other YAML errors surface as scanner/parser errors
        raise ConfigError(f"{where} could not be read: {exc}") from None
