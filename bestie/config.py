"""Typed per-stage configuration.

Only stage entry points (``bestie.stages.*``) read configuration. Each stage declares a frozen dataclass
whose field defaults are the defaults of ``../shared/docs/METHOD.md``; :func:`from_dict` builds it from
the matching section of ``config.yaml`` (already validated by the workflow schema) and rejects unknown
keys and wrongly typed values with a :class:`~bestie.errors.ConfigError` naming the key.

One strict parser reads every boolean, integer and float of the configuration, whatever the entry
point (``config.yaml``, ``snakemake --config``, the CLI's ``--params`` / ``--dataset`` / ``--set``):
:func:`parse_bool`, :func:`parse_int`, :func:`parse_float`. Native values pass; strings (``--config``
hands nested values to the workflow as strings) are parsed, never judged by truthiness, so ``"false"``
and ``"no"`` are False and ``"maybe"`` is an error naming the key.

Dotted overrides (``bestie.refine=false``) are applied by :func:`apply_overrides`, typed by the
workflow schema (``workflow/schemas/config.schema.yaml``, generated from the dataclasses).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import typing
from typing import Any, Mapping, MutableMapping, Sequence, TypeVar

from bestie.errors import ConfigError

__all__ = [
    "from_dict",
    "to_dict",
    "parse_bool",
    "parse_int",
    "parse_float",
    "parse_by_schema",
    "coerce_by_schema",
    "apply_overrides",
    "split_override",
    "load_schema",
    "OVERRIDE_KEY",
    "RENAMED_SECTIONS",
    "rename_old_sections",
    "current_section",
]

T = TypeVar("T")

#: spellings of a boolean in a string value (compared case-insensitively); anything else is an error
BOOL_WORDS: dict[str, bool] = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
#: spellings of null in a string value, for keys whose type allows null
NULL_WORDS = ("null", "none", "~")
#: the ``snakemake --config`` key that carries dotted overrides (Snakemake refuses dots in its own keys)
OVERRIDE_KEY = "set"

_INT_RE = re.compile(r"[+-]?[0-9]+")

#: config sections renamed so that a stage's section is the object of its name (docs/ARCHITECTURE.md,
#: "Names of the stages"): old name -> new name. Configs with the old name keep working, with a warning.
RENAMED_SECTIONS: dict[str, str] = {"inference": "instances", "export": "pseudo_labels"}
_warned_sections: set[str] = set()
log = logging.getLogger("bestie")


def current_section(name: str) -> str:
    """The section name ``name`` stands for today: the new name of a renamed section (a warning logged
    once per process and old name), else ``name`` itself."""
    new = RENAMED_SECTIONS.get(name)
    if new is None:
        return name
    if name not in _warned_sections:
        _warned_sections.add(name)
        log.warning("DeprecationWarning: config section '%s' is now called '%s'; the old name still works but "
                    "will be removed (rename it in your config)", name, new)
    return new


def rename_old_sections(config: MutableMapping[str, Any], source: str = "the config") -> list[str]:
    """Rename the old sections of a workflow config (:data:`RENAMED_SECTIONS`) in place.

    Args:
        config: the whole configuration (top-level sections).
        source: how the config is named in the error message.

    Returns:
        The old names found (each logged once per process as deprecated).

    Raises:
        ConfigError: a section is given under both its old and its new name (both names in the message).
    """
    found: list[str] = []
    for old, new in RENAMED_SECTIONS.items():
        if old not in config:
            continue
        if new in config:
            raise ConfigError(f"config sections '{old}' and '{new}' are both given in {source}: '{old}' is the old "
                              f"name of '{new}'; keep one (move its keys under '{new}')")
        config[new] = config.pop(old)
        current_section(old)
        found.append(old)
    return found


def parse_bool(value: Any, key: str) -> bool:
    """A boolean config value: ``True`` / ``False``, or one of the strings ``true yes on`` / ``false no
    off`` (any case, surrounding blanks ignored).

    Raises:
        ConfigError: any other value (also numbers: ``1`` is not a boolean), naming ``key``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    raise ConfigError(f"config key '{key}': expected true/false (or yes/no, on/off), got {value!r}")


def parse_int(value: Any, key: str) -> int:
    """An integer config value: an ``int`` (not a bool) or a string of decimal digits with an optional sign.

    Raises:
        ConfigError: anything else (``1.5``, ``"10x"``, ``True``), naming ``key``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value.strip())
    raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")


def parse_float(value: Any, key: str) -> float:
    """A real config value: an ``int`` / ``float`` (not a bool) or a string Python's ``float`` reads
    (``"0.5"``, ``"1e-3"``); NaN is refused.

    Raises:
        ConfigError: anything else, naming ``key``.
    """
    out: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            out = None
    if out is None or math.isnan(out):
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    return out


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if type(None) in args and isinstance(value, str) and value.strip().lower() in NULL_WORDS:
            return None
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
        if isinstance(value, str) and value.strip().lower() in NULL_WORDS:
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
        return parse_float(value, key)
    if tp is int:
        return parse_int(value, key)
    if tp is bool:
        return parse_bool(value, key)
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


# ------------------------------------------------------------------------------ schema-typed values
def load_schema(path: Any = None) -> dict[str, Any]:
    """The workflow's config schema (default ``workflow/schemas/config.schema.yaml`` of this checkout).

    Raises:
        ConfigError: the file is missing or not YAML.
    """
    import yaml
    from pathlib import Path

    p = Path(path) if path is not None else Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
    try:
        # the C loader where PyYAML has it: this runs in every DAG build (snakemake -n)
        return yaml.load(p.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the config schema {p}: {exc}") from exc


def _types(prop: Mapping[str, Any]) -> list[str]:
    t = prop.get("type")
    if t is None:
        return []
    return list(t) if isinstance(t, (list, tuple)) else [t]


def parse_by_schema(value: Any, prop: Mapping[str, Any], key: str) -> Any:
    """``value`` typed by the JSON-schema property ``prop``: strings of a boolean / integer / number / null
    key go through :func:`parse_bool` / :func:`parse_int` / :func:`parse_float`; a string of an array or
    object key is read as YAML (``[5, 7]``, ``{refine: false}``) and its items typed in turn; lists and
    mappings are typed item by item. Values of other types are returned unchanged (the schema validation
    that follows judges them).

    Args:
        value: the value (a string from the command line, or a native value).
        prop: the schema property of the key (``type`` a string or a list of strings).
        key: the dotted key, for messages.

    Raises:
        ConfigError: a string that is none of the key's types (names the key and the types).
    """
    types = _types(prop)
    if isinstance(value, str) and types and types != ["string"]:
        text = value.strip()
        if "null" in types and text.lower() in NULL_WORDS:
            return None
        faults: list[str] = []
        for t in types:
            try:
                if t == "boolean":
                    return parse_bool(text, key)
                if t == "integer":
                    return parse_int(text, key)
                if t == "number":
                    return parse_float(text, key)
                if t in ("array", "object"):
                    import yaml

                    try:
                        loaded = yaml.safe_load(text)
                    except yaml.YAMLError:
                        continue
                    if isinstance(loaded, list if t == "array" else dict):
                        return parse_by_schema(loaded, prop, key)
            except ConfigError as exc:
                faults.append(str(exc))
                continue
        if "string" in types:
            return value
        if len(faults) == 1:
            raise ConfigError(faults[0])
        raise ConfigError(f"config key '{key}': expected {' or '.join(types)}, got {value!r}")
    if isinstance(value, list) and "array" in types and isinstance(prop.get("items"), Mapping):
        return [parse_by_schema(v, prop["items"], f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and "object" in types and isinstance(prop.get("properties"), Mapping):
        return coerce_by_schema(value, prop, key)
    return value


def coerce_by_schema(config: Mapping[str, Any], schema: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of ``config`` whose string values are typed by ``schema`` (see :func:`parse_by_schema`).

    ``snakemake --config bestie='{max_iters: 10}'`` hands the workflow ``{"max_iters": "10"}``; this
    makes it ``10`` before validation. Keys the schema does not know are kept as they are (validation
    names them).
    """
    props = schema.get("properties") or {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out[k] = parse_by_schema(v, props[k], key) if k in props else v
    return out


def split_override(item: str) -> tuple[str, str]:
    """``"bestie.refine=false"`` -> ``("bestie.refine", "false")`` (the value may hold ``=``).

    Raises:
        ConfigError: no ``=``, or an empty key / key part.
    """
    key, sep, value = str(item).partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected dotted.key=value (e.g. bestie.refine=false)")
    return key, value


def apply_overrides(config: MutableMapping[str, Any], items: Sequence[str] | str,
                    schema: Mapping[str, Any]) -> list[str]:
    """Set dotted keys of ``config`` in place, each value typed by the schema property of its key.

    Args:
        config: the nested configuration (sections are created when absent).
        items: ``["bestie.refine=false", "bestie.max_iters=10"]``, or one string of such items separated
            by blanks or commas (quote a value holding either: ``'classifier_pam.lr_steps=[5, 7]'``).
        schema: the config schema (:func:`load_schema`). An old section name (:data:`RENAMED_SECTIONS`)
            sets the key of the new section, with a deprecation warning.

    Returns:
        The keys set, in order (under the new section names).

    Raises:
        ConfigError: a malformed item, an unknown key (names it and lists the valid keys at that level),
            or a value of the wrong type (names the key).
    """
    if isinstance(items, str):
        import shlex

        try:
            items = [part for tok in shlex.split(items) for part in _split_commas(tok)]
        except ValueError as exc:
            raise ConfigError(f"overrides {items!r}: {exc}") from exc
    done: list[str] = []
    for item in items:
        key, text = split_override(item)
        parts = key.split(".")
        if parts[0] in RENAMED_SECTIONS and parts[0] not in (schema.get("properties") or {}):
            parts[0] = current_section(parts[0])
            key = ".".join(parts)
        node: Any = schema
        target: Any = config
        for depth, part in enumerate(parts):
            props = node.get("properties") if isinstance(node, Mapping) else None
            if not props or part not in props:
                where = ".".join(parts[:depth]) or "the top level"
                valid = ", ".join(sorted(props)) if props else "none (not a section)"
                raise ConfigError(f"unknown config key '{key}' in override {item!r}; valid keys of {where}: {valid}")
            node = props[part]
            if depth < len(parts) - 1:
                sub = target.get(part)
                if sub is None:
                    sub = target[part] = {}
                elif not isinstance(sub, MutableMapping):
                    raise ConfigError(f"override {item!r}: config key '{'.'.join(parts[:depth + 1])}' is not a section")
                target = sub
        target[parts[-1]] = parse_by_schema(text, node, key)
        done.append(key)
    return done


def _split_commas(token: str) -> list[str]:
    """Split ``a=1,b.c=2`` at commas that start a new ``key=`` (a list value ``[5,7]`` stays whole)."""
    out: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(token):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(token[start:i])
            start = i + 1
    out.append(token[start:])
    return [p for p in (x.strip() for x in out) if p]
