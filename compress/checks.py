"""Value checks every config schema runs in ``__post_init__``: numbers in range and [height, width] sizes.

Each raises a one-line :class:`compress.errors.ConfigError` naming the key. They depend on compress.errors only,
so that every layer's schemas (the core's ``DatasetSpec``, the stages' recipes) use the same words.
"""

from __future__ import annotations

import math

from compress.errors import ConfigError


def require_positive(key: str, value: float | None, allow_none: bool = False) -> None:
    """`key` must be a finite number > 0 (or None when allow_none)."""
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(f"{key}={value!r}: expected a number > 0")


def require_non_negative(key: str, value: float | None, allow_none: bool = False) -> None:
    """`key` must be a finite number >= 0 (or None when allow_none)."""
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise ConfigError(f"{key}={value!r}: expected a number >= 0")


def require_at_least(key: str, value: int | None, minimum: int, why: str = "") -> None:
    """`key` must be an integer >= minimum."""
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reason = f" ({why})" if why else ""
        raise ConfigError(f"{key}={value!r}: expected an integer >= {minimum}{reason}")


def check_size(name: str, value: list[int] | None) -> None:
    """Raise a ConfigError unless ``value`` is None or [height, width], both positive multiples of 32."""
    if value is not None and (len(value) != 2 or any(int(v) <= 0 or int(v) % 32 for v in value)):
        raise ConfigError(f"{name}: got {list(value)}, expected [height, width], both positive multiples of 32")
