"""Generic YAML config machinery (no schema): load, Hydra-style overrides, `${a.b}` interpolation, `???`, typed
conversion into dataclasses.

    raw = load_yaml(path)                      # PyYAML + YAML-1.1 floats (`1e-3` is a float, not a string)
    raw = apply_overrides(raw, ["a.b=1", "+a.new=2", "~a.c", "++a.d=[1,2]"])   # before resolution
    plain = resolve(raw)                       # every ${a.b.c} replaced; `???` stays the string "???"
    cfg = from_dict(SomeConfig, plain, "")     # typed dataclasses; `???` -> Missing(path), error when used

The run schema (RunConfig and its sections) and `load_config` live in nest_ssl/run_config.py.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot run: the message names the full key path (`.path` when it is one value's)."""

    path: str | None = None


class Missing:
    """A `???` value. Printing shows `???`; using it (str, path, bool, iteration, numbers) raises naming the key."""

    __slots__ = ("path",)

    def __init__(self, path: str = ""):
        self.path = path

    def __repr__(self) -> str:
        return "???"

    def __eq__(self, other: object) -> bool:  # so owners' `x == "???"` checks keep working
        return isinstance(other, Missing) or (isinstance(other, str) and other == MISSING_STR)

    def __hash__(self) -> int:
        return hash(MISSING_STR)

    def _fail(self, *args, **kwargs):
        raise ConfigError(f"{self.path or 'value'} is mandatory ('???') but was not set; "
                          f"set it in the YAML or on the command line ({self.path or 'key'}=...)")

    __str__ = __fspath__ = __bool__ = __iter__ = __len__ = __int__ = __float__ = __index__ = __getitem__ = _fail
    __contains__ = __lt__ = __le__ = __gt__ = __ge__ = __add__ = __radd__ = __sub__ = __rsub__ = _fail
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __floordiv__ = __mod__ = __neg__ = __abs__ = _fail


MISSING_STR = "???"


def is_missing(value: Any) -> bool:
    return isinstance(value, Missing) or (isinstance(value, str) and value == MISSING_STR)


# ----------------------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader whose float rule also takes `1e-3`, `5e4` (YAML 1.2 / OmegaConf style, no dot required)."""


_FLOAT_RE = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """One scalar/list/dict written as YAML (`1e-3`, `[0.9,0.98]`, `null`, `'quoted'`); empty text is ''."""
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also writes tuples (as lists) and `Missing` (as `???`), e.g. for dataclasses.asdict(run)."""


_Dumper.add_representer(tuple, lambda d, v: d.represent_list(list(v)))
_Dumper.add_representer(Missing, lambda d, v: d.represent_str(MISSING_STR))


def to_yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------------------------------ overrides
def _split(key: str) -> list[str]:
    parts = key.split(".")
    if not key or any(p == "" for p in parts):
        raise ConfigError(f"invalid override key {key!r}")
    return parts


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return node[int(part)]
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: parent is not a mapping ({node!r})")
    if part not in node:
        if not create:
            raise ConfigError(f"Could not override '{path}': no such key")
        node[part] = {}
    return node[part]


def schema_has(cls: Any, parts: list[str]) -> bool:
    """Whether dataclass `cls` has the dotted key `parts` (Optional[...] sections looked through; a plain-dict
    section knows no keys of its own)."""
    for part in parts:
        if typing.get_origin(cls) in (Union, types.UnionType):  # Optional[Section]
            cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), None)
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        cls = typing.get_type_hints(cls)[part]
    return True


def _apply_one(tree: dict, text: str, schema: Any = None) -> None:
    op, body = ("~", text[1:]) if text.startswith("~") else ("++", text[2:]) if text.startswith("++") \
        else ("+", text[1:]) if text.startswith("+") else ("=", text)
    key, eq, val = body.partition("=")
    if op != "~" and not eq:
        raise ConfigError(f"override {text!r} must look like key=value, +key=value, ++key=value or ~key")
    parts = _split(key.strip())
    # a key the schema knows (it has a default) is set with plain `a.b=v` even when the YAML does not carry it
    known = op == "=" and schema is not None and schema_has(schema, parts)
    parent = tree
    for i, part in enumerate(parts[:-1]):
        parent = _child(parent, part, ".".join(parts[: i + 1]), create=op in ("+", "++") or known)
    last = parts[-1]
    if isinstance(parent, list) and last.lstrip("-").isdigit():
        if not -len(parent) <= int(last) < len(parent):
            raise ConfigError(f"Could not override '{key}': index out of range")
        if op == "~":
            del parent[int(last)]
        else:
            parent[int(last)] = parse_value(val)
        return
    if not isinstance(parent, dict):
        raise ConfigError(f"Could not override '{key}': parent is not a mapping")
    exists = last in parent
    if op == "~":
        if not exists:
            raise ConfigError(f"Could not delete '{key}': no such key")
        del parent[last]
    elif op == "=" and not exists and not known:
        raise ConfigError(f"Could not override '{key}': no such key (use +{key}=... to add a new key)")
    elif op == "+" and exists:
        raise ConfigError(f"Could not append to '{key}': it already exists (use {key}=... or ++{key}=...)")
    else:
        parent[last] = parse_value(val)


def apply_overrides(tree: dict, overrides: typing.Iterable[str], schema: Any = None) -> dict:
    """Hydra's dotted syntax on a copy: `a.b=v` (must exist in the tree, or in dataclass `schema`), `+a.b=v` (must
    not exist), `++a.b=v`, `~a.b`."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        _apply_one(tree, text, schema)
    return tree


# -------------------------------------------------------------------------------------------------- interpolation
_INNER = re.compile(r"\$\{([^${}]*)\}")  # an interpolation with no interpolation inside: innermost first


class _Resolver:
    def __init__(self, root: dict):
        self.root, self.done, self.stack = root, {}, []
        self.origins: dict[str, str] = {}  # key -> the key whose value it took whole through ${...}

    def lookup(self, key: str, ref_from: str) -> Any:
        node, walked = self.root, []
        for part in key.strip().split("."):
            walked.append(part)
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConfigError(f"{ref_from}: interpolation ${{{key}}} refers to unknown key '{key}'")
            if isinstance(node, str) and "${" in node:
                node = self.resolve(node, ".".join(walked))
        return self.resolve(node, key.strip())

    def resolve(self, node: Any, path: str) -> Any:
        if path in self.done:
            return self.done[path]
        if path in self.stack:
            chain = " -> ".join(self.stack[self.stack.index(path):] + [path])
            raise ConfigError(f"interpolation cycle at '{path}': {chain}")
        self.stack.append(path)
        try:
            if isinstance(node, dict):
                out = {k: self.resolve(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
            elif isinstance(node, list):
                out = [self.resolve(v, f"{path}.{i}") for i, v in enumerate(node)]
            elif isinstance(node, str) and "${" in node:
                out = self.interpolate(node, path)
            else:
                out = node
        finally:
            self.stack.pop()
        self.done[path] = out
        return out

    def interpolate(self, text: str, path: str) -> Any:
        while True:
            m = _INNER.search(text)
            if m is None:
                return text
            value = self.lookup(m.group(1), path)
            if m.span() == (0, len(text)):
                key = m.group(1).strip()
                self.origins[path] = self.origins.get(key, key)
                return copy.deepcopy(value)  # whole-string: keep int/list/dict type
            if is_missing(value):
                raise ConfigError(f"{path}: interpolation ${{{m.group(1)}}} refers to a mandatory value ('???')")
            text = text[: m.start()] + str(value) + text[m.end():]


def resolve(tree: dict) -> dict:
    """A plain copy of `tree` with every `${a.b.c}` replaced (absolute paths from the root)."""
    return _Resolver(tree).resolve(tree, "")


def missing_keys(tree: Any, path: str = "") -> list[str]:
    """Full key paths of every `???` left in a plain tree."""
    if isinstance(tree, dict):
        return [m for k, v in tree.items() for m in missing_keys(v, f"{path}.{k}" if path else str(k))]
    if isinstance(tree, list):
        return [m for i, v in enumerate(tree) for m in missing_keys(v, f"{path}.{i}")]
    return [path] if is_missing(tree) else []


def resolve_with_origins(tree: dict) -> tuple[dict, dict[str, str]]:
    """resolve(), plus {key: the key its whole value came from through `${}`} (followed to the end of a chain)."""
    resolver = _Resolver(tree)
    return resolver.resolve(tree, ""), resolver.origins


def blame_origin(err: ConfigError, origins: dict[str, str]) -> ConfigError:
    """A bad value reached through `${}` is the source key's fault: name that key first."""
    src = origins.get(err.path or "")
    if src is None:
        return err
    text = str(err)
    text = f"{src}{text[len(err.path):]}" if text.startswith(err.path) else f"{src}: {text}"
    blamed = ConfigError(f"{text} (used through ${{{src}}} by {err.path})")
    blamed.path = src
    return blamed


# ------------------------------------------------------------------------------------------------ typed from_dict
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _bad(path: str, value: Any, tp: Any) -> ConfigError:
    err = ConfigError(f"{path}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    err.path = path
    return err


def _scalar(tp: type, value: Any, path: str) -> Any:
    """bool / int / float / str by YAML's habits: `5e4` is an int where one is wanted, `1e-3` read as a string by a
    plain PyYAML loader is a float, `name: 123` is the string "123" (as OmegaConf does); no bool passes as a number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and number and float(value).is_integer():
        return int(value)
    if tp is float and (number or isinstance(value, str)):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and (number or isinstance(value, str)):
        return str(value)
    raise _bad(path, value, tp)


def _union(tp: Any, args: tuple, value: Any, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    if type(value) in args and type(value) in (bool, int, float, str):
        return value  # exact match first: `1.0` stays a float in Union[int, float] (1 and 1.0 differ there)
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own error names the key (an unknown key in a section, ...)
        return _convert(options[0], value, path)
    for arg in options:
        try:
            return _convert(arg, value, path)
        except ConfigError:
            pass
    raise _bad(path, value, tp)


def _sequence(tp: Any, origin: Any, args: tuple, value: Any, path: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise _bad(path, value, tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{path}={value!r}: expected {len(args)} items")
        return tuple(_convert(a, v, f"{path}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    out = [_convert(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    return tuple(out) if (tp is tuple or origin is tuple) else out


def _convert(tp: Any, value: Any, path: str) -> Any:
    """`value` as annotation `tp` wants it, or a ConfigError naming `path`, the value and the expected type."""
    if is_missing(value):
        return Missing(path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is Union or origin is types.UnionType:
        return _union(tp, args, value, path)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r}: allowed values are {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp in (bool, int, float, str):
        return _scalar(tp, value, path)
    if tp in (list, tuple) or origin in (list, tuple):
        return _sequence(tp, origin, args, value, path)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _bad(path, value, tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _bad(path, value, tp)
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a plain dict: unknown keys and wrong types raise naming the full key path.

    `_target_` is ignored here (nemo_compat resolves it); `???` values become `Missing(path)`.
    """
    where = path or "<root>"
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}={data!r}: expected a mapping for {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields and k != "_target_"]
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(_join(path, k)) for k in unknown)} for {cls.__name__}; "
                          f"valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints.get(name, Any), data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(path, name)}' for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ------------------------------------------------------------------------------------------------------------ CLI
def config_file_from_args(argv: list[str]) -> tuple[Path, list[str]]:
    """`FILE`, `--config FILE` or `--config-path DIR --config-name NAME` (`.yaml` optional), then overrides."""
    argv, opts = list(argv), {}
    for flag in ("--config", "--config-path", "--config-name"):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                opts[flag] = argv[i + 1]
                del argv[i: i + 2]
                break
            if a.startswith(flag + "="):
                opts[flag] = a.split("=", 1)[1]
                del argv[i]
                break
    if "--config-name" in opts:
        name = opts["--config-name"]
        name = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
        return Path(opts.get("--config-path", ".")) / name, argv
    if "--config-path" in opts:
        raise ConfigError("--config-path needs --config-name")
    if "--config" in opts:
        return Path(opts["--config"]), argv
    if not argv or "=" in argv[0] or argv[0].startswith("~"):
        raise ConfigError("usage: FILE|--config FILE|--config-path DIR --config-name NAME "
                          "[overrides...]")
    return Path(argv[0]), argv[1:]


if __name__ == "__main__":  # the command-line tool moved with the run schema: say where, never exit 0 silently
    raise SystemExit("the config command is `python -m nest_ssl.run_config FILE [overrides...]` (--help for more)")
