"""One typed config per program: dataclass defaults, then a YAML file, then CLI flags.

Every program declares a dataclass; :func:`parse_config` turns its fields into
``--flag`` options (``snake_case`` -> ``--kebab-case``), reads ``--config FILE.yaml``
first and lets explicit flags win. :func:`dump_config` writes the resolved config
next to whatever the program produces.

A config may be COMPOSED of others, so that each option is defined once (one default, one help,
one check): a field whose value is a dataclass and whose metadata has ``flatten: True`` puts the
inner dataclass's fields at the top level of the flags, the YAML and the dumped config (they stay
flat for users). ``rename`` maps an inner field to another flat name (``{"splits":
"train_splits"}``); ``hide`` lists inner fields that are not options (derived by the program).
Two options with one flat name are a programming error (``TypeError``).

An option that was renamed is listed in :data:`RENAMED`: given under its old name (flag or YAML
key) to a program that has the new one, it stops with one line naming the new name, instead of a
bare "unrecognized arguments".

Every option is declared with :func:`option` (the trainer's, the shard tools' and the user
commands' alike): its default, its help, its check (``check=``: a function of the value that
returns an error text or None; run for flags and YAML keys alike, by :func:`build_config`), and how
the command line spells it (``choices``, ``parse`` (str -> value, also applied to YAML strings,
so it must accept its own string results), ``metavar``, ``short`` (``-o``), ``positional``
(``INPUT...``), ``switch`` (a flag without a value, ``--overwrite``), ``const`` (a value that may
be left out), ``append``). :func:`options_parser` is
the argparse parser of a config; :func:`parse_config` parses into the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from restorer.errors import UserError, first_line
from restorer.fsutil import atomic_write_text

T = TypeVar("T")

# Renamed options: old flat name -> (new flat name, why). Each stays listed for as long as old
# recipes and command lines may still use it.
RENAMED: dict[str, tuple[str, str]] = {
    "epoch_samples": ("epoch_patches", "it always counted patches"),
}


# What an option's metadata may hold (anything else is a programming error: TypeError).
OPTION_KEYS = frozenset(
    {"help", "check", "choices", "parse", "metavar", "short", "positional", "switch", "const", "append", "cli"}
)


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A config field: its one default, help text and check (see the module doc for ``meta``). A
    list default is copied per instance; no default: the option must be given (flag or YAML)."""
    unknown = set(meta) - OPTION_KEYS
    if unknown:
        raise TypeError(f"option(): unknown metadata {sorted(unknown)}")
    meta = {"help": help, **meta} if help else meta
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(low: float) -> Callable[[Any], str | None]:
    """A check: the value (each value of a list; None passes) must be >= ``low``."""

    def check(value: Any) -> str | None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v < low:
                return f"must be >= {low}, got {v}"
        return None

    return check


def within(low: float, high: float) -> Callable[[Any], str | None]:
    """A check: the value (each value of a list; None passes) must lie in ``low..high``."""

    def check(value: Any) -> str | None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not low <= v <= high:
                return f"must be {low}..{high}, got {v}"
        return None

    return check


def positive(value: Any) -> str | None:
    """A check: the value (None passes) must be > 0."""
    return None if value is None or value > 0 else f"must be positive, got {value}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_name(flat: FlatField) -> str:
    """How a user sees the option: ``--flag`` or, for a positional, its ``METAVAR``."""
    if flat.field.metadata.get("positional"):
        return str(flat.field.metadata.get("metavar", flat.name.upper()))
    return _flag(flat.name)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Return (element type, is_list) for a field annotation (Optional unwrapped)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _base_type(args[0])
    if origin in (list, tuple, Sequence):
        return (args[0] if args else str), True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One option of a (possibly composed) config: its flat name and where it lives."""

    name: str  # the flag / YAML key, snake_case
    path: tuple[str, ...]  # attribute path from the top-level config
    field: dataclasses.Field
    type: Any


def flat_fields(cls: type) -> list[FlatField]:
    """The options of ``cls`` in declaration order, nested ``flatten`` fields expanded in place."""
    out: list[FlatField] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("flatten"):
            rename, hide = field.metadata.get("rename", {}), set(field.metadata.get("hide", ()))
            for inner in flat_fields(hints[field.name]):
                if inner.path[0] not in hide:
                    out.append(
                        dataclasses.replace(
                            inner, name=rename.get(inner.name, inner.name), path=(field.name, *inner.path)
                        )
                    )
        else:
            out.append(FlatField(field.name, (field.name,), field, hints[field.name]))
    seen: set[str] = set()
    for f in out:
        if f.name in seen:
            raise TypeError(f"{cls.__name__}: option {f.name!r} is defined twice")
        seen.add(f.name)
    return out


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _argument(flat: FlatField) -> tuple[list[str], dict[str, Any]]:
    """(names, add_argument keywords) of one option; its value is None when it is not given."""
    meta = flat.field.metadata
    tp, is_list = _base_type(flat.type)
    default = _default(flat.field)
    help_text = meta.get("help", "")
    if default is dataclasses.MISSING:
        help_text = f"{help_text} (required)"
    elif not (meta.get("switch") or default is None or "default" in help_text):
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
    kwargs: dict[str, Any] = {"default": None, "help": help_text.replace("%", "%%")}  # argparse %-formats help
    for key in ("choices", "metavar"):
        if key in meta:
            kwargs[key] = meta[key]
    if "const" in meta:
        kwargs.update(nargs="?", const=meta["const"])
    if meta.get("switch"):
        kwargs.update(action="store_true")
        kwargs.pop("metavar", None)
    elif tp is bool:
        kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
    else:
        kwargs.update(type=meta.get("parse") or (tp if tp in (int, float) else str))
        if is_list:
            kwargs.update(nargs="+", action="extend" if meta.get("append") else None)
    if meta.get("positional"):
        kwargs["nargs"] = "+" if is_list else None
        return [flat.name], kwargs
    kwargs["dest"] = flat.name
    return [*([meta["short"]] if "short" in meta else []), _flag(flat.name)], kwargs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per (flattened) dataclass field; defaults are left as None (= not given).
    A field with ``metadata["const"]`` may be given without a value (``--channels-last``)."""
    for flat in flat_fields(cls):
        if flat.field.metadata.get("cli") is not False:
            names, kwargs = _argument(flat)
            parser.add_argument(*names, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def renamed_note(name: str, cls: type, flags: bool = True) -> str | None:
    """``--OLD was renamed --NEW (why)`` when ``name`` is a renamed option whose new name ``cls``
    has (YAML spelling with ``flags=False``); None otherwise."""
    if name not in RENAMED or RENAMED[name][0] not in {f.name for f in flat_fields(cls)}:
        return None
    new, why = RENAMED[name]
    old_name, new_name = (_flag(name), _flag(new)) if flags else (name, new)
    return f"{old_name} was renamed {new_name} ({why})"


def check_renamed_flags(argv: Sequence[str], cls: type) -> None:
    """One :class:`UserError` line for the first renamed flag in ``argv`` (``--old`` or ``--old=v``)."""
    for arg in argv:
        if arg.startswith("--"):
            note = renamed_note(arg[2:].split("=", 1)[0].replace("-", "_"), cls)
            if note:
                raise UserError(note)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of option: value at the top level")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _construct(cls: type[T], values: dict[tuple[str, ...], Any]) -> T:
    """``cls`` from {attribute path: value}; nested configs are built from their own paths."""
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in values.items():
        if len(path) == 1:
            kwargs[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    hints = typing.get_type_hints(cls)
    for name, inner in nested.items():
        kwargs[name] = _construct(hints[name], inner)
    return cls(**kwargs)


def _given_value(flat: FlatField, value: Any) -> Any:
    """A value as given (a flag parsed by argparse, or a YAML value): YAML strings go through the
    option's ``parse``; nargs and YAML give lists where the field holds a tuple."""
    parse = flat.field.metadata.get("parse")
    if parse is not None and isinstance(value, str):
        try:
            value = parse(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise UserError(f"{option_name(flat)}: {first_line(exc)}") from None
    if isinstance(value, list) and typing.get_origin(flat.type) is tuple:
        value = tuple(value)
    return value


def check_option(flat: FlatField, value: Any) -> None:
    """The option's own checks: its choices (for YAML values; argparse checks flags) and its
    ``check``; one :class:`UserError` line naming the option."""
    choices = flat.field.metadata.get("choices")
    if choices is not None and value is not None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v not in choices:
                raise UserError(f"{option_name(flat)} must be one of {', '.join(map(str, choices))}, got {v!r}")
    check = flat.field.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise UserError(f"{option_name(flat)} {problem}")


def build_config(cls: type[T], overrides: dict[str, Any], source: str = "config") -> T:
    """Instantiate ``cls`` from a flat dict of options, rejecting unknown keys and missing required
    options with one clear line; then run each option's check and the config's own (its
    ``validate()``), if it has one."""
    fields = {f.name: f for f in flat_fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        notes = [note for name in unknown if (note := renamed_note(name, cls, flags=False))]
        raise UserError(
            f"{source}: unknown option(s) {', '.join(unknown)} for {cls.__name__}" + "".join(f"; {n}" for n in notes)
        )
    missing = [
        option_name(f)
        for name, f in fields.items()
        if _default(f.field) is dataclasses.MISSING and name not in overrides
    ]
    if missing:
        raise UserError(f"{source}: {', '.join(missing)} required")
    values = {fields[name].path: _given_value(fields[name], value) for name, value in overrides.items()}
    cfg = _construct(cls, values)
    for flat in fields.values():
        check_option(flat, _value_at(cfg, flat.path))
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def _value_at(cfg: Any, path: tuple[str, ...]) -> Any:
    for attr in path:
        cfg = getattr(cfg, attr)
    return cfg


def options_parser(
    cls: type, prog: str | None = None, description: str | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The argparse parser of ``cls``: ``--config YAML`` and one option per field (``--help``
    shows ``description``, the options and ``epilog``, kept as written)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_options(parser, cls)
    return parser


def _add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument(
        "--config", type=str, metavar="YAML", help="YAML file of option: value pairs (flags given here win)"
    )
    add_dataclass_arguments(parser, cls)


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    epilog: str | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> T:
    """Parse ``argv`` into ``cls``: defaults < ``--config`` YAML < explicit flags. A given
    ``parser`` (the program's own flags on it) gets ``--config`` and the options added."""
    if parser is None:
        parser = options_parser(cls, prog, description, epilog)
    else:
        _add_options(parser, cls)
    check_renamed_flags(sys.argv[1:] if argv is None else argv, cls)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if ns.config:
        values.update(load_yaml(ns.config))
    values.update({k: v for k, v in vars(ns).items() if k != "config" and v is not None})
    return build_config(cls, values, source=ns.config or "command line")


def config_dict(cfg: Any) -> dict[str, Any]:
    """The flat {option: value} of a config (what YAML files, flags and W&B see)."""
    flat = {f.name: _value_at(cfg, f.path) for f in flat_fields(type(cfg))}
    return json.loads(json.dumps(flat, default=str))


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, yaml.safe_dump(config_dict(cfg), sort_keys=False))
    return p
