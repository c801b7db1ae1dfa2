"""Typed per-stage configuration.

Only stage entry points (``bestie.stages.*``) read configuration. Each stage declares a frozen dataclass
whose field defaults are the defaults of ``../shared/docs/METHOD.md``; :func:`from_dict` builds it from
the matching section of ``config.yaml`` (already validated by the workflow schema) and rejects unknown
keys and wrongly typed values with a :class:`~bestie.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from bestie.errors import ConfigError

__all__ = ["from_dict", "to_dict"]

T = TypeVar("T")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        errors = []
        for arg in args:
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:  # try the next member of the union
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}': expected null, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {value!r}")
            return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, section: str) -> T:
    """Build the frozen dataclass ``cls`` from a config mapping.

    Args:
        cls: a dataclass type whose fields all have defaults.
        data: the config section (``None`` or ``{}`` gives the defaults).
        section: the section name, used in error messages (e.g. ``"classifier"``).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: on an unknown key (the valid keys are listed) or a value of the wrong type.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _check_type(v, hints[k], f"{section}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass ``obj`` as a plain JSON-serialisable dict (tuples become lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
