"""Reading config values: the YAML loader, key-name suggestions, and conversion to a key's type.

Type rules: ints are accepted for float keys; a numeric string for a float key is converted,
because PyYAML (YAML 1.1) reads `5e-7` -- no dot -- as the string "5e-7" while `5.0e-7` is a float,
and either spelling clearly means the number. Everything else is strict: no string for an int or
bool key, no float for an int key, no null anywhere. A key with `one_or_list` (algorithm.loss_type)
takes one name or a list of names (`[sigmoid]` is `sigmoid`); a float-list key (loss_weights) takes
numbers. Path keys (`Key.path` in the schema) have a
leading `~` and their `$VAR`s expanded when set (`expand_path`); an unset variable is an error.
Command-line values are text and are parsed by the type of the key they set (`parse_text`).
"""

from __future__ import annotations

import difflib
import numbers
import os
import re
from typing import Any

import yaml

from flux_jax.config_schema import LEAVES, SCHEMA, SECTIONS, SUBSECTIONS, Key, section_schema


class ConfigError(ValueError):
    """An invalid config: each entry of `errors` names the offending key; `source` the file."""

    def __init__(self, errors: str | list[str], source: str | None = None):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            lines = "\n".join(f"  - {e}" for e in self.errors)
            message = f"{len(self.errors)} problems:\n{lines}"
        super().__init__(f"{source}: {message}" if source else message)


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean (true/false)",
    tuple: "a list of integers",
}
_FLOAT_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_TRUE_TEXT = ("true", "yes", "on", "1")
_FALSE_TEXT = ("false", "no", "off", "0")
_ENV_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")  # the forms os.path.expandvars expands


def expand_path(path: str) -> str:
    """`path` with a leading `~` / `~user` and every `$VAR` / `${VAR}` expanded, as a shell would.

    os.path leaves what it cannot expand in place, which later creates a directory literally named
    `~` or `$RUN`; this raises ValueError naming the unset variable or unknown user instead.
    """
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        user = expanded.split(os.sep, 1)[0]
        raise ValueError(f"cannot expand {user!r} in {path!r}: no such user (or HOME unset)")
    unset = [a or b for a, b in _ENV_VAR.findall(expanded) if (a or b) not in os.environ]
    if unset:
        raise ValueError(f"environment variable ${unset[0]} is not set (in {path!r})")
    return os.path.expandvars(expanded)


def unknown_key(path: str) -> str:
    """The unknown-key message, naming the closest valid key if there is one."""
    head, dot, rest = path.partition(".")
    # The innermost section the path is in: `model.lora.rnak` is compared within model.lora.
    for section in sorted(SUBSECTIONS, key=len, reverse=True):
        if path.startswith(section + "."):
            head, rest = section, path[len(section) + 1 :]
            break
    by_leaf: dict[str, str] = {}  # leaf name -> first full key ending in it
    for full in LEAVES:
        by_leaf.setdefault(full.rsplit(".", 1)[-1], full)
    leaf = path.rsplit(".", 1)[-1]
    if by_leaf.get(leaf, path) != path:  # A right key at the wrong level: `beta` -> algorithm.beta.
        match = [by_leaf[leaf]]
    elif dot and head in (*SECTIONS, *SUBSECTIONS):  # Compare within the section: the shared
        match = difflib.get_close_matches(rest, list(section_schema(head)), n=1, cutoff=0.6)
        match = [f"{head}.{m}" for m in match]  # `head.` would make any two keys look alike.
    else:
        candidates = [*LEAVES] if dot else list(SCHEMA)
        match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not match:
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        match = [by_leaf[close[0]]] if close else []
    if match:
        return f"unknown key '{path}'; did you mean '{match[0]}'?"
    if head in (*SECTIONS, *SUBSECTIONS):
        valid = ", ".join(section_schema(head))
        return f"unknown key '{path}'; valid keys in '{head}': {valid}"
    return f"unknown key '{path}'; valid top-level keys: {', '.join(SCHEMA)}"


def _type_error(path: str, key: Key, value: Any) -> ConfigError:
    kind = type(key.default)
    got = "null" if value is None else f"{type(value).__name__} {value!r}"
    if kind is tuple and key.item_kind is str:
        return ConfigError(f"{path} expects a list of strings, got {got}")
    if kind is tuple and key.item_kind is float:
        return ConfigError(f"{path} expects a list of numbers such as [0.8, 0.2], got {got}")
    if key.or_bool:
        return ConfigError(
            f"{path} expects true, false or {' or '.join(map(repr, key.choices))}, got {got}"
        )
    if key.one_or_list:
        return ConfigError(
            f"{path} expects a name or a non-empty list of names such as [sigmoid, sft], got {got}"
        )
    hint = ""
    if kind is int and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        hint = " (write a plain integer such as 1000: YAML reads 1e3 as a string)"
    return ConfigError(f"{path} expects {_KIND_NAMES[kind]}, got {got}{hint}")


def coerce(path: str, key: Key, value: Any) -> Any:
    """`value` converted to the type of `key.default`, or ConfigError naming `path`."""
    kind = type(key.default)
    is_bool = isinstance(value, bool)
    if (kind is bool or key.or_bool) and is_bool:
        return value
    if kind is int and isinstance(value, numbers.Integral) and not is_bool:
        return int(value)
    if kind is float and isinstance(value, numbers.Real) and not is_bool:
        return float(value)
    if kind is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    if key.one_or_list and isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            # One name in a list is that name: `[sigmoid]` and `sigmoid` are the same config.
            return tuple(value) if len(value) > 1 else value[0]
    if kind is str and isinstance(value, str):
        if not key.path:
            return value
        try:
            return expand_path(value)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    if kind is tuple and isinstance(value, (list, tuple)):
        if key.item_kind is str:
            if all(isinstance(v, str) for v in value):
                return tuple(value)
        elif key.item_kind is float:
            if all(_is_number(v) for v in value):
                return tuple(float(v) for v in value)
        elif all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            return tuple(int(v) for v in value)
    raise _type_error(path, key, value)


def _is_number(value: Any) -> bool:
    """A real number, or a numeric string (YAML's `5e-7`); never a bool."""
    if isinstance(value, str):
        return _FLOAT_TEXT.fullmatch(value.strip()) is not None
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_text(path: str, key: Key, text: str) -> Any:
    """A command-line value (always text) parsed by the type of the key it sets."""
    kind, stripped = type(key.default), text.strip()
    if key.one_or_list and ("," in stripped or stripped.startswith("[")):
        # `[sigmoid,sft]` or `sigmoid,sft` (quotes optional): a list of names.
        parts = [p.strip().strip("'\"") for p in stripped.strip("[]").split(",")]
        return coerce(path, key, [p for p in parts if p])
    if kind is bool or (key.or_bool and stripped.lower() in _TRUE_TEXT + _FALSE_TEXT):
        if stripped.lower() in _TRUE_TEXT + _FALSE_TEXT:
            return stripped.lower() in _TRUE_TEXT
    elif kind is int:
        try:
            return int(stripped)
        except ValueError:
            pass
    elif kind is tuple:
        parts = [p.strip() for p in stripped.strip("()[]").split(",") if p.strip()]
        if key.item_kind is str:  # q_proj,v_proj (quotes optional)
            return tuple(p.strip("'\"") for p in parts)
        if key.item_kind is float:  # [0.8,0.2,1]
            return coerce(path, key, parts)
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            pass
    else:
        return coerce(path, key, text)
    raise _type_error(path, key, text)


class StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would otherwise silently overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
