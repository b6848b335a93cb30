"""Config schemas: the keys, types and value rules of every config section, checked before any stage starts.

Each stage module declares its config sections as dataclasses (the *schema*: which keys exist and their types);
the *values* and their comments live in ``configs/*.yaml``. The schemas are registered in Hydra's ConfigStore and
``configs/config.yaml`` and every group option name theirs first in their defaults list, so composing the config
is where Hydra / OmegaConf refuse an unknown key or a value of the wrong type (``reconstruct.stpes=5``,
``reconstruct.steps=abc``). Schema fields default to ``MISSING`` so that the YAML files stay the one place for
defaults.

What a type cannot say (ranges, choices, "a number or [low, high]", ``auto``) is a :func:`rule` on the field;
:func:`check_values` applies the rules of the whole config in one place, and also refuses keys added with
``+key=value`` (Hydra adds those even to a structured config) and keys left without a value (``???``).
Both kinds of error become one :class:`ConfigError` naming the key (:func:`config_error`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

T = TypeVar("T")


# ----------------------------------------------------------------------------- value rules


@dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy beyond its type. Bounds apply to each entry of a list;
    ``test`` is for values a type cannot describe (``what`` says what it accepts, for the message)."""

    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    test: Callable[[Any], bool] | None = None
    what: str = ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` breaks the rule, or None (null values are the type's business: Optional or not)."""
        if value is None:
            return None
        if self.choices and not any(type(value) is type(c) and value == c for c in self.choices):
            return f"must be one of {list(self.choices)}"
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if self.ge is not None and not v >= self.ge:
                return f"must be >= {self.ge}"
            if self.gt is not None and not v > self.gt:
                return f"must be > {self.gt}"
            if self.le is not None and not v <= self.le:
                return f"must be <= {self.le}"
        if self.test is not None and not self.test(value):
            return f"must be {self.what}"
        return None


def rule(*, choices: tuple = (), ge: float | None = None, gt: float | None = None, le: float | None = None,
         test: Callable[[Any], bool] | None = None, what: str = "") -> Any:
    """A schema field (no default: the YAML has it) whose value :func:`check_values` checks against a :class:`Rule`."""
    return field(default=MISSING, metadata={"rule": Rule(tuple(choices), ge, gt, le, test, what)})


def section(schema: type, **rule_kwargs: Any) -> Any:
    """A schema field holding a nested section (its fields' values come from the YAML); ``rule_kwargs`` as for
    :func:`rule`, for a check across its keys (its value is then a dict)."""
    return field(default_factory=schema, metadata={"rule": Rule(**rule_kwargs)} if rule_kwargs else {})


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_range(value: Any) -> tuple[float, float]:
    """A "number or [low, high]" value as (low, high); a number is the range [v, v]."""
    return (float(value), float(value)) if is_number(value) else (float(value[0]), float(value[1]))


def number_or_range(*, gt: float | None = None, ge: float | None = None) -> Any:
    """A field that holds a number (fixed) or [low, high] (sampled per run). OmegaConf has no Union of a float and
    a list, so the field is typed Any and this rule checks the shape and the bounds (on low)."""

    def test(v: Any) -> bool:
        if not (is_number(v) or (isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v) and v[0] <= v[1])):
            return False
        low = as_range(v)[0]
        return (gt is None or low > gt) and (ge is None or low >= ge)

    if gt is not None:
        what = f"a number > {gt} or a range [low, high] with {gt} < low <= high"
    elif ge is not None:
        what = f"a number >= {ge} or a range [low, high] with {ge} <= low <= high"
    else:
        what = "a number or a range [low, high] with low <= high"
    return rule(test=test, what=what)


def auto_or_int(*, ge: int) -> Any:
    """A field that holds ``auto`` or an integer >= ``ge`` (typed Any: OmegaConf has no Union of str and int)."""
    return rule(test=lambda v: v == "auto" or (is_int(v) and v >= ge), what=f"auto or an integer >= {ge}")


# ----------------------------------------------------------------------------- sections and registration


@dataclass(frozen=True)
class Section:
    """A top-level config key and its schema. ``variants``: schemas (subclasses of ``schema``) that options of
    a config group with more keys name in their defaults list (``backbone/dino_vits16.yaml``: ``schema_pretrained``)."""

    name: str
    schema: type
    variants: dict[str, type] = field(default_factory=dict)


def register(root: type, sections: list[Section]) -> None:
    """Register the schemas with Hydra's ConfigStore: the whole config as ``schema`` (named first in
    config.yaml's defaults), each section as ``<section>/schema`` and its variants as ``<section>/<name>``
    (named first in the group options' defaults). Idempotent."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="schema", node=root)
    for sec in sections:
        store.store(group=sec.name, name="schema", node=sec.schema)
        for name, schema in sec.variants.items():
            store.store(group=sec.name, name=name, node=schema)


def root_schema(base: type, sections: list[Section]) -> type:
    """The whole config's dataclass, ``Config``: ``base``'s top-level keys plus one field per section. It belongs to
    ``base``'s module (bind it there as ``Config``, so that a pickled config finds its class)."""
    root = dataclasses.make_dataclass("Config", [(s.name, s.schema, section(s.schema)) for s in sections], bases=(base,))
    root.__module__ = base.__module__
    return root


# ----------------------------------------------------------------------------- checks


def _unknown_key(path: str, known: list[str]) -> ConfigError:
    prefix, _, key = path.rpartition(".")
    close = difflib.get_close_matches(key, known, n=1)
    where = f"{prefix}." if prefix else ""
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; known keys here: {sorted(known)}"
    return ConfigError(f"unknown config key '{path}'{hint}")


def check_values(node: DictConfig, prefix: str = "") -> None:
    """Apply the schema's rules to every value under ``node``; refuse keys the schema lacks and keys without a
    value. Sections that are not dataclasses (``trainer``: passed to lightning.Trainer) are left to their library."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in fields:  # added by a `+key=value` override
            raise _unknown_key(path, list(fields))
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"config key '{path}' has no value: set it, e.g. {path}=...")
        try:
            value = node[key]
        except OmegaConfBaseException as err:  # e.g. an interpolation to a key that does not exist
            raise config_error(err) from None
        if isinstance(value, DictConfig):
            check_values(value, f"{path}.")
        rule_ = fields[key].metadata.get("rule")
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        problem = rule_.problem(plain) if rule_ else None
        if problem:
            raise ConfigError(f"config key '{path}' {problem}, got {plain!r}")


def config_error(err: Exception) -> ConfigError:
    """A Hydra / OmegaConf composition error as one line naming the key (their messages span several lines and
    describe OmegaConf's internals); errors without a key (an unknown group option) keep Hydra's message."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    key = getattr(cause, "full_key", None) if cause is not None else None
    if not key:  # e.g. an unknown group option: Hydra's message lists the options (the schemas are none)
        lines = str(err).split("\nConfig search path")[0].strip().splitlines()
        return ConfigError("\n".join(line for line in lines if not line.strip().startswith("schema")))
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and not isinstance(cause, MissingMandatoryValue):
        schema = getattr(cause, "object_type", None)
        known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
        return _unknown_key(key, known)
    return ConfigError(f"config key '{key}': {str(cause).splitlines()[0]}")


# ----------------------------------------------------------------------------- one section from Python


def shipped(schema: type[T], option: str, **changes: Any) -> T:
    """One section's shipped values (``configs/<option>.yaml``, e.g. ``"select/default"``) as its dataclass, with
    ``changes`` merged in (nested sections as dicts) and the rules checked: for Python callers (tests,
    benchmarks) that run one stage's core without composing the whole config."""
    values = OmegaConf.load(CONFIG_DIR / f"{option}.yaml")
    values.pop("defaults", None)
    name = option.split("/")[0]  # the section, so that messages name its keys in full
    try:
        node = OmegaConf.merge({name: OmegaConf.structured(schema)}, {name: values}, {name: changes})
    except OmegaConfBaseException as err:
        raise config_error(err) from None
    check_values(node[name], f"{name}.")
    return OmegaConf.to_object(node[name])
