"""FluxConfig: every setting of a flux_jax DPO run, its default, and its validation.

FluxConfig is an `ml_collections.ConfigDict` with a fixed schema (config_schema.py): values read as
attributes (`config.algorithm.beta`, `config.checkpoint.save_steps`), every key has a default, and
every way of building one -- `FluxConfig()`/`default()`, `from_dict`, `from_yaml` (the tutorial's
`dpo-config.yaml` verbatim), `from_file` (big_vision-style `get_config()` files, `path.py:arg`),
`apply_overrides` (CLI `key=value` strings) -- checks keys, types and ranges and raises
`ConfigError` naming the key (and the file) on the first load.

Assignments are checked too: `config.algorithm.bta = 1` or `config.algorithm.beta = "x"` raise
`ConfigError` at once. Cross-field and range checks (e.g. `batch_size % grad_accum_steps`) cannot
run per assignment, so code that mutates a config by hand calls `validate()` afterwards; every
loader does so itself.

How a value is read and converted to its key's type (YAML's `5e-7`, `~` and `$VAR` in paths, CLI
text) is config_parse.py's job.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import yaml

from flux_jax.config_parse import (
    ConfigError,
    StrictYamlLoader,
    coerce,
    expand_path,
    parse_text,
    unknown_key,
)
from flux_jax.config_rules import range_errors
from flux_jax.config_schema import LEAVES, SCHEMA, SECTIONS, SUBSECTIONS, section_schema

# ConfigError and expand_path are public here (flux_jax.config) since before config_parse.py.
__all__ = ["ConfigError", "FluxConfig", "expand_path"]


def _is_mapping(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class _Section(ml_collections.ConfigDict):
    """One schema section (`config.algorithm`, or a section inside one: `config.model.lora`): a
    locked ConfigDict with checked writes. `name` is its dotted path."""

    def __init__(self, name: str):
        super().__init__(type_safe=True, sort_keys=False)
        object.__setattr__(self, "_name", name)
        for key, spec in section_schema(name).items():
            default = _Section(f"{name}.{key}") if isinstance(spec, dict) else spec.default
            ml_collections.ConfigDict.__setitem__(self, key, default)
        self.lock()

    def __setitem__(self, key: str, value: Any) -> None:
        head, dot, rest = key.partition(".")
        path = f"{self._name}.{head}"
        schema = section_schema(self._name)
        if head not in schema or (dot and not isinstance(schema[head], dict)):
            raise ConfigError(unknown_key(f"{self._name}.{key}"))
        if isinstance(schema[head], dict):  # a section inside this one
            _assign_in_section(self._fields[head], rest if dot else None, value)
            return
        value = coerce(path, schema[head], value)
        if schema[head].one_or_list or schema[head].or_bool:
            # A name (str) or several (tuple), or a name or a bool: ConfigDict's type_safe would
            # refuse the switch; coerce has already checked the value.
            self._fields[head] = value
            return
        ml_collections.ConfigDict.__setitem__(self, head, value)

    def __setattr__(self, attribute: str, value: Any) -> None:
        self[attribute] = value

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_") or attribute not in self._fields:
            raise AttributeError(unknown_key(f"{self._name}.{attribute}"))
        return self._fields[attribute]

    def to_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The section as a plain dict (tuples become lists, so it is YAML/JSON-ready)."""
        return {
            k: v.to_dict() if isinstance(v, _Section) else _plain(v)
            for k, v in self._fields.items()
        }

    def copy_and_resolve_references(self, visit_map: Any = None) -> _Section:
        return _restore_section(self._name, self.to_dict())

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore_section, (self._name, self.to_dict())


def _assign_in_section(section: _Section, key: str | None, value: Any) -> None:
    """`section[key] = value`; with no key, `value` must be a mapping and each of its keys is set
    (`config.algorithm = dict(beta=0.2)` updates those keys, the others keep their values)."""
    if key is not None:
        section[key] = value
    elif _is_mapping(value):
        for sub_key, sub_value in value.items():
            section[sub_key] = sub_value
    else:
        raise ConfigError(
            f"{section._name} is a section: set its keys "
            f"({', '.join(section_schema(section._name))}), not {type(value).__name__} {value!r}"
        )


def _restore_section(name: str, values: Mapping[str, Any]) -> _Section:
    section = _Section(name)
    for key, value in values.items():
        section[key] = value
    return section


class FluxConfig(ml_collections.ConfigDict):
    """The configuration of a flux_jax DPO run; see the module docstring and `SCHEMA`.

    `FluxConfig(values)` starts from the defaults, applies the nested mapping `values` and
    validates; `source` (a file name) prefixes every error message.
    """

    def __init__(self, values: Mapping[str, Any] | None = None, *, source: str | None = None):
        super().__init__(type_safe=True, sort_keys=False)
        for key, entry in SCHEMA.items():
            default = _Section(key) if isinstance(entry, dict) else entry.default
            ml_collections.ConfigDict.__setitem__(self, key, default)
        self.lock()
        if values is not None:
            if not _is_mapping(values):
                raise ConfigError(
                    f"expected a mapping of config keys, got {type(values).__name__}", source
                )
            errors = self._merge(values)
            if errors:
                raise ConfigError(errors, source)
        self._check(source)

    # --- Construction -----------------------------------------------------------------------

    @classmethod
    def default(cls) -> FluxConfig:
        """Every key at its default: the tiny built-in model, the tutorial's hyperparameters."""
        return cls()

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any] | ml_collections.ConfigDict, *, source: str | None = None
    ) -> FluxConfig:
        """Defaults updated with a nested mapping (dict or ConfigDict); keys missing keep them."""
        if isinstance(values, ml_collections.ConfigDict):
            values = values.to_dict()
        return cls(values, source=source)

    @classmethod
    def from_yaml(cls, path: str | pathlib.Path) -> FluxConfig:
        """Load a YAML file such as the tutorial's `dpo-config.yaml`; keys missing keep defaults."""
        source = str(path)
        try:
            text = pathlib.Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file: {e.strerror}", source) from None
        try:
            values = yaml.load(text, Loader=StrictYamlLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML: {e}", source) from None
        return cls({} if values is None else values, source=source)

    @classmethod
    def from_file(cls, spec: str | pathlib.Path) -> FluxConfig:
        """Load `configs/x.py` (its `get_config()`), `configs/x.py:arg` (`get_config(arg)`), or
        a `.yaml`/`.yml` file (`from_yaml`)."""
        spec = str(spec)
        path, has_arg, arg = spec.partition(".py:")
        path = path + ".py" if has_arg else spec
        if path.endswith((".yaml", ".yml")):
            return cls.from_yaml(path)
        if not path.endswith(".py"):
            raise ConfigError("expected a .py config file (optionally path.py:arg) or .yaml", path)
        if not pathlib.Path(path).is_file():
            raise ConfigError("no such config file", path)
        module_spec = importlib.util.spec_from_file_location(
            f"flux_jax_user_config_{abs(hash(path))}", path
        )
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
            if not hasattr(module, "get_config"):
                raise ConfigError("defines no get_config() function")
            values = module.get_config(arg) if has_arg else module.get_config()
        except ConfigError as e:  # An assignment in the file failed: name the file.
            raise ConfigError(e.errors, path) from None
        if not _is_mapping(values):
            raise ConfigError(f"get_config() returned {type(values).__name__}, not a config", path)
        return cls.from_dict(values, source=path)

    # --- Changing and checking ---------------------------------------------------------------

    def apply_overrides(self, overrides: Iterable[str]) -> FluxConfig:
        """Apply CLI-style `dotted.key=value` strings (values parsed by the key's type), then
        validate. All-or-nothing: on any error `self` is unchanged. A leading `--config.` or
        `config.` on a key is ignored, so raw `--config.algorithm.beta=0.2` flags work too.
        Returns self."""
        if isinstance(overrides, str):
            overrides = [overrides]
        trial = FluxConfig(self.to_dict())
        errors = []
        for item in overrides:
            key, eq, text = item.partition("=")
            key = key.strip().removeprefix("--").removeprefix("config.")
            if not eq:
                errors.append(f"override {item!r}: expected key=value")
            elif key in SECTIONS or key in SUBSECTIONS:
                errors.append(f"override {item!r}: {key} is a section; set one of its keys")
            elif key not in LEAVES:
                errors.append(f"override {item!r}: {unknown_key(key)}")
            else:
                try:
                    trial[key] = parse_text(key, LEAVES[key], text)
                except ConfigError as e:
                    errors.extend(f"override {item!r}: {msg}" for msg in e.errors)
        if errors:
            raise ConfigError(errors)
        trial.validate()
        self._merge(trial.to_dict())
        return self

    def validate(self) -> FluxConfig:
        """Check every type, range and cross-field rule; raise ConfigError listing all failures.
        Loaders run this themselves; call it after changing a config by hand. Returns self."""
        self._check(None)
        return self

    def _check(self, source: str | None) -> None:
        errors = []
        for path, key in LEAVES.items():
            try:
                coerce(path, key, self[path])
            except ConfigError as e:
                errors.extend(e.errors)
        if not errors:  # Range rules assume the types are right.
            errors = range_errors(self)
        if errors:
            raise ConfigError(errors, source)

    def _merge(self, values: Mapping[str, Any], prefix: str = "") -> list[str]:
        """Assign a nested mapping key by key; returns the error messages instead of raising."""
        errors = []
        for key, value in values.items():
            path = f"{prefix}{key}"
            is_section = path in (SUBSECTIONS if prefix else SECTIONS)
            if is_section and (value is None or _is_mapping(value)):
                # `checkpoint:` with every line below it commented out is YAML null: no change.
                errors += self._merge(value or {}, prefix=f"{path}.")
                continue
            try:
                self[path] = value
            except ConfigError as e:
                errors.extend(e.errors)
        return errors

    def __setitem__(self, key: str, value: Any) -> None:
        head, dot, rest = str(key).partition(".")
        if head in SECTIONS:
            _assign_in_section(self._fields[head], rest if dot else None, value)
        elif dot or head not in SCHEMA:
            raise ConfigError(unknown_key(str(key)))
        else:
            ml_collections.ConfigDict.__setitem__(self, key, coerce(key, SCHEMA[key], value))

    def __setattr__(self, attribute: str, value: Any) -> None:
        self[attribute] = value

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_") or attribute not in self._fields:
            raise AttributeError(unknown_key(attribute))
        return self._fields[attribute]

    # --- Output ------------------------------------------------------------------------------

    def to_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The config as plain nested dicts in schema order (tuples as lists: YAML/JSON-ready)."""
        return {
            k: v.to_dict() if isinstance(v, _Section) else _plain(v)
            for k, v in self._fields.items()
        }

    def to_yaml(self, path: str | pathlib.Path | None = None, **kwargs: Any) -> str:
        """The config as YAML text that `from_yaml` reads back; also written to `path` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            path = pathlib.Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# flux_jax config: load with FluxConfig.from_yaml(path)\n" + text)
        return text

    def copy_and_resolve_references(self, visit_map: Any = None) -> FluxConfig:
        return FluxConfig(self.to_dict())

    def __reduce__(self) -> tuple[Any, ...]:
        return FluxConfig, (self.to_dict(),)

    def __str__(self) -> str:
        return self.to_yaml()

    def __repr__(self) -> str:
        return f"FluxConfig({self.to_dict()!r})"

    def __dir__(self) -> list[str]:
        return [*self._fields, *dir(type(self))]
