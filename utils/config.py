"""One parser for every step: typed dataclasses in, flat DeepSpeed-Chat-style flags out.

A config is a dataclass whose fields are scalars, lists, or *groups* (nested dataclasses declared with
`group(...)`). A group's fields become flags with the group's prefix, so `ModelArgs` gives
`--model_name_or_path` in step 1 and `--actor_model_name_or_path` / `--critic_model_name_or_path` in step 3:
each flag is declared once and reused. The docstring under a field is its `--help` text.

Values come from, in rising priority: field defaults, `--config file.yaml` (keys are flag names),
then command-line flags. `save_config` writes the resolved values next to a checkpoint; `load_config` reads
them back.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
CONFIG_FILE = "chatrlhf_config.yaml"


def group(cls: type, prefix: str = "", shared: tuple[str, ...] = (), **defaults) -> Any:
    """A nested config group whose flags are `prefix + field name`; `defaults` override the group's own.

    Fields named in `shared` keep their plain flag name: two groups of one config may both share a field (step 3's
    actor and critic optimiser groups share `--num_warmup_steps`), and then the one flag sets it in both."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in list(defaults) + list(shared):
        if key not in names:
            raise TypeError(f"{cls.__name__} has no field {key!r}")
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"prefix": prefix, "defaults": defaults, "shared": tuple(shared)})


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flags(cls: type, prefix: str = "", defaults_override: dict | None = None, shared: tuple[str, ...] = ()):
    """Yields (flag_name, path, type, default, help) for every leaf field, groups flattened. A shared field
    (see `group`) of two groups yields its one flag name twice, with each group's path."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = f.metadata.get("prefix", "")
            for name, path, t, d, h in _flags(tp, prefix + sub, f.metadata.get("defaults"),
                                              f.metadata.get("shared", ())):
                yield name, (f.name,) + path, t, d, h
            continue
        if defaults_override and f.name in defaults_override:
            default = defaults_override[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield (f.name if f.name in shared else prefix + f.name), (f.name,), tp, default, docs.get(f.name, "")


def flag_table(cls: type) -> dict[str, tuple[list[tuple], Any, Any, str]]:
    """{flag_name: ([paths], type, default, help)}: each flag once. A name reached twice must be a shared field
    of the same type and default in both places; anything else is a flag declared twice."""
    table: dict = {}
    for name, path, tp, default, help_text in _flags(cls):
        if name in table:
            paths, tp0, default0, _ = table[name]
            if (tp0, default0) != (tp, default) or not _is_shared(cls, path) or not _is_shared(cls, paths[0]):
                raise TypeError(f"{cls.__name__}: flag --{name} is declared twice")
            paths.append(path)
        else:
            table[name] = ([path], tp, default, help_text)
    return table


def _is_shared(cls: type, path: tuple) -> bool:
    """Whether the leaf at `path` is a `shared` field of its group."""
    hints, node = typing.get_type_hints(cls), None
    for key in path[:-1]:
        node = {f.name: f for f in dataclasses.fields(cls)}[key]
        cls = hints[key]
        hints = typing.get_type_hints(cls)
    return node is not None and path[-1] in node.metadata.get("shared", ())


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def _add_argument(parser: argparse.ArgumentParser, name: str, tp, default, help_text: str) -> None:
    tp, optional = _unwrap_optional(tp)
    # argparse %-formats help strings: a literal % in a docstring would break --help.
    shown = "required" if default is dataclasses.MISSING else f"default: {default}"
    kwargs: dict[str, Any] = {"dest": name, "help": f"{help_text} ({shown})".replace("%", "%%")}
    origin = typing.get_origin(tp)
    if tp is bool:
        # `--flag` alone turns it on (DeepSpeed-Chat's store_true); `--flag false` turns it off.
        kwargs.update(nargs="?", const=True, type=_str2bool)
    elif origin is Literal:
        kwargs.update(choices=list(typing.get_args(tp)), type=type(typing.get_args(tp)[0]))
    elif origin in (list, tuple):
        kwargs.update(nargs="*", type=typing.get_args(tp)[0])
    else:
        conv = tp if tp in (int, float, str) else str
        if optional:
            kwargs["type"] = lambda v, conv=conv: None if v.lower() in ("none", "null") else conv(v)
        else:
            kwargs["type"] = conv
    parser.add_argument(f"--{name}", **kwargs)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of flag values (keys are flag names without dashes)")
    for name, (_, tp, default, help_text) in flag_table(cls).items():
        _add_argument(parser, name, tp, default, help_text)
    return parser


def _convert(value, tp, where: str):
    """Checks and converts a YAML value to the field's type."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: null is not allowed")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            return value if isinstance(value, bool) else _str2bool(str(value))
        if origin is Literal:
            if value not in typing.get_args(tp):
                raise ValueError(f"must be one of {list(typing.get_args(tp))}")
            return value
        if origin in (list, tuple):
            items = value if isinstance(value, list) else [value]
            return [typing.get_args(tp)[0](v) for v in items]
        if tp is float and isinstance(value, str):
            return float(value)
        # int(1.5) and int(True) would pass silently.
        if (tp in (int, float) and isinstance(value, bool)) or (
                tp is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected {tp.__name__}")
        return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{where}: bad value {value!r}: {e}") from None


def from_flat(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Builds `cls` from a flat {flag_name: value} dict, converting types; unknown keys are errors."""
    spec = flag_table(cls)
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; run with --help for the list")
    tree: dict = {}
    for name, (paths, tp, default, _) in spec.items():
        if name in values:
            value = _convert(values[name], tp, f"{where}: {name}")
        elif default is dataclasses.MISSING:
            raise ValueError(f"{where}: --{name} is required")
        else:
            value = default
        for path in paths:
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = list(value) if isinstance(value, list) else value
    return _instantiate(cls, tree)


def _instantiate(cls, tree: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _instantiate(hints[k], v, prefix + fields[k].metadata.get("prefix", ""))
              if dataclasses.is_dataclass(hints[k]) else v for k, v in tree.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        if not prefix:
            raise
        # A group's checks name its unprefixed flags (`--zero_stage`); name the copy given (`--actor_zero_stage`).
        message = re.sub(r"--(\w+)", lambda m: f"--{prefix}{m[1]}" if m[1] in fields else m[0], str(e))
        raise ValueError(message) from None


def to_flat(cfg) -> dict[str, Any]:
    """The inverse of `from_flat`: {flag_name: value} for every leaf field."""
    out = {}
    for name, ([path, *_], _, _, _) in flag_table(type(cfg)).items():
        node = cfg
        for key in path:
            node = getattr(node, key)
        out[name] = list(node) if isinstance(node, tuple) else node
    return out


def parse_config(cls: type[T], argv: list[str] | None = None) -> T:
    """`--config file.yaml` then flags -> a validated `cls` (its `__post_init__` checks cross-field rules)."""
    parser = build_parser(cls)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        values.update(read_yaml(config_path))
    values.update(args)
    try:
        return from_flat(cls, values, where=config_path or "command line")
    except ValueError as e:
        parser.error(str(e))


def read_yaml(path: str | Path, option: str = "--config") -> dict[str, Any]:
    """A YAML mapping of flag names (leading dashes dropped) to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        # yaml's own message spans lines and names the stream, not the option; its mark gives line and column.
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ": ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
        raise ValueError(f"{option} {path}: {where}invalid YAML ({what})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping (name: value), got {type(data).__name__}")
    return {str(k).lstrip("-"): v for k, v in data.items()}


def save_config(cfg, directory: str | Path, name: str = CONFIG_FILE) -> Path:
    """Writes the resolved config (flat flag names) as YAML into `directory`."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_flat(cfg), sort_keys=False))
    return path


def load_config(cls: type[T], directory: str | Path, name: str = CONFIG_FILE) -> T:
    return from_flat(cls, read_yaml(Path(directory) / name), where=str(Path(directory) / name))
