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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per (flattened) dataclass field; defaults are left as None (= not given).
    A field with ``metadata["const"]`` may be given without a value (``--channels-last``)."""
    for flat in flat_fields(cls):
        field = flat.field
        if field.metadata.get("cli") is False:
            continue
        tp, is_list = _base_type(flat.type)
        help_text = field.metadata.get("help", "")
        default = (
            field.default
            if field.default is not dataclasses.MISSING
            else (field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        )
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": flat.name, "default": None, "help": help_text}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if "const" in field.metadata:
            kwargs.update(nargs="?", const=field.metadata["const"])
        if tp is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif is_list:
            kwargs.update(type=tp if tp in (int, float) else str, nargs="+")
            if field.metadata.get("append"):
                kwargs.update(action="extend")
        else:
            kwargs.update(type=tp if tp in (int, float) else str)
        parser.add_argument(_flag(flat.name), **kwargs)


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


def build_config(cls: type[T], overrides: dict[str, Any], source: str = "config") -> T:
    """Instantiate ``cls`` from a flat dict of options, rejecting unknown keys with one clear
    line; then run the config's own check (its ``validate()``), if it has one."""
    fields = {f.name: f for f in flat_fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        notes = [note for name in unknown if (note := renamed_note(name, cls, flags=False))]
        raise UserError(
            f"{source}: unknown option(s) {', '.join(unknown)} for {cls.__name__}" + "".join(f"; {n}" for n in notes)
        )
    values = {}
    for name, value in overrides.items():
        if isinstance(value, list) and typing.get_origin(fields[name].type) is tuple:
            value = tuple(value)  # YAML and nargs give lists
        values[fields[name].path] = value
    cfg = _construct(cls, values)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    epilog: str | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> T:
    """Parse ``argv`` into ``cls``: defaults < ``--config`` YAML < explicit flags."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="YAML file of option: value pairs (flags given here win)"
    )
    add_dataclass_arguments(parser, cls)
    check_renamed_flags(sys.argv[1:] if argv is None else argv, cls)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if ns.config:
        values.update(load_yaml(ns.config))
    values.update({k: v for k, v in vars(ns).items() if k != "config" and v is not None})
    return build_config(cls, values, source=ns.config or "command line")


def config_dict(cfg: Any) -> dict[str, Any]:
    """The flat {option: value} of a config (what YAML files, flags and W&B see)."""
    flat = {}
    for f in flat_fields(type(cfg)):
        value = cfg
        for attr in f.path:
            value = getattr(value, attr)
        flat[f.name] = value
    return json.loads(json.dumps(flat, default=str))


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, yaml.safe_dump(config_dict(cfg), sort_keys=False))
    return p
