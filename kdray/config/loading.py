"""Reading user YAML strictly (UTF-8 text, a size and value limit that stops alias bombs, no duplicate keys,
finite numbers only) and dotted overrides (``train.epochs=5``) applied to a config tree."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from kdray.config.errors import FINITE, _field_name
from kdray.errors import ConfigError

OVERRIDE_FORM = "KEY=VALUE with a dotted key and a YAML value, e.g. train.epochs=5"


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Return a copy of ``raw`` with dotted-path overrides applied (``a.b.0.c=value``).

    String values are parsed as YAML scalars/flow collections, so ``lr=1e-3`` gives a float. A bad
    ``--set`` text is a ConfigError whose field is ``--set`` and whose value is that text.
    """
    out = copy.deepcopy(raw)
    if isinstance(overrides, dict):
        for path, value in overrides.items():
            set_dotted(out, path, value)
        return out
    for text in overrides:
        try:
            set_dotted(out, *_split_override(text))
        except ConfigError as e:
            raise ConfigError("--set", text, e.allowed) from None
    return out


def _split_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as (key, VALUE parsed as YAML)."""
    if "=" not in text:
        raise ConfigError("--set", text, OVERRIDE_FORM)
    key, val = text.split("=", 1)
    try:
        return key.strip(), parse_yaml(val, "--set", text, "the value")
    except ConfigError as e:
        raise ConfigError("--set", text, f"{OVERRIDE_FORM}; the value must be {e.allowed}") from None


def set_dotted(tree: dict, path: str, value: Any) -> None:
    """Set ``tree[a][b][0]... = value`` for ``path`` ``a.b.0...``, creating missing mappings on the way."""
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(path, value, f"a dotted key of non-empty parts, e.g. train.optimizer.lr (not {path!r})")
    node: Any = tree
    for i, part in enumerate(parts):
        key = _child_key(node, parts[: i + 1])
        if i == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def _child_key(node: Any, parts: list[str]) -> Any:
    """The key of ``parts[-1]`` inside ``node`` (the value at ``parts[:-1]``): a list index or a mapping key."""
    part, parent = parts[-1], ".".join(parts[:-1])
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(".".join(parts), part, f"a list index below {len(node)} after {parent} (not {part!r})")
        return int(part)
    if not isinstance(node, dict):
        raise ConfigError(".".join(parts), part, f"a path through mappings and lists: {parent} is {node!r} "
                                                 f"({type(node).__name__}), it has no {part!r}")
    return part


MAX_YAML_BYTES = 1_000_000  # configs and spaces are a few kB; anything this big is a wrong file


MAX_YAML_VALUES = 50_000  # values in one document, each use of an alias (*name) counting its anchor's values




_MERGE_TAG = "tag:yaml.org,2002:merge"


NUL = b"\x00"  # never in YAML text: the mark of a binary file


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, but refusing duplicate keys at any depth (YAML keeps the last one silently)
    and documents over MAX_YAML_VALUES values, aliases expanded: a "billion laughs" stops within a few
    thousand nodes. Merge keys (``<<: *base``) are allowed; keys written beside them override the merged ones."""

    def __init__(self, text: str, what: str, shown: Any, source: str):
        super().__init__(text)
        self.what, self.shown, self.source, self.composed = what, shown, source, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.composed += 1
        if self.composed > MAX_YAML_VALUES:
            raise self._too_big(())
        return super().compose_node(parent, index)

    def construct_document(self, node: Any) -> Any:
        self._expanded_size(node, (), {}, set())
        return super().construct_document(node)

    def _too_big(self, path: tuple) -> ConfigError:
        return ConfigError(_field_name(path) if path else self.what, self.shown,
                           f"at most {MAX_YAML_VALUES:,} values (each use of a YAML alias *name counts the values of "
                           f"its anchor: this looks like an alias bomb or a wrong file)")

    def _expanded_size(self, node: Any, path: tuple, sizes: dict, active: set) -> int:
        """The number of values under ``node`` with aliases expanded, memoised per node (linear time)."""
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigError(_field_name(path) if path else self.what, self.shown,
                              "a value that does not contain itself (a YAML alias inside its own anchor)")
        active.add(id(node))
        total = 1
        for child_path, child in self._children(node, path):
            total += self._expanded_size(child, child_path, sizes, active)
            if total > MAX_YAML_VALUES:
                raise self._too_big(path)
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    def _children(self, node: Any, path: tuple) -> list[tuple[tuple, Any]]:
        """(path, node) of the values inside a mapping or sequence node; refuses duplicate mapping keys."""
        if isinstance(node, yaml.SequenceNode):
            return [(path + (i,), v) for i, v in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            return []
        out, first_line = [], {}
        for k, v in node.value:
            if k.tag == _MERGE_TAG:  # merged keys live in this mapping's namespace
                out += [(path, k), (path, v)]
                continue
            key = self.construct_object(k) if isinstance(k, yaml.ScalarNode) else k  # complex keys: never equal
            if key in first_line:
                where = _field_name(path + (key,))
                raise ConfigError(where, key, f"each key once per mapping ({where!r} is at lines {first_line[key]} "
                                              f"and {k.start_mark.line + 1} of {self.source}; YAML would silently "
                                              f"keep the last)")
            first_line[key] = k.start_mark.line + 1
            out += [(path + (key,), k), (path + (key,), v)]
        return out


def parse_yaml(text: str, what: str, shown: Any, source: str) -> Any:
    """``text`` parsed like ``yaml.safe_load`` with the checks of :class:`_StrictLoader`; any problem is a
    ConfigError on field ``what`` with value ``shown`` (a file path, an override) naming the line."""
    try:
        return _load(_StrictLoader(text, what, shown, source))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1} of {source}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).replace('"<unicode string>"', source)
        raise ConfigError(what, shown, f"valid YAML ({problem}{where})") from None
    except RecursionError:
        raise ConfigError(what, shown, "YAML nested at most a few hundred levels deep") from None


def _load(loader: _StrictLoader) -> Any:
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A user's YAML file as a dict: an existing, readable UTF-8 text file of at most MAX_YAML_BYTES holding one
    mapping, with no duplicate keys, alias bombs or non-finite numbers. ``what`` names the file in errors."""
    p = Path(path)
    data = _read_bytes(p, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(what, str(path), f"UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}, line "
                                           f"{line}, is not UTF-8: save the file as UTF-8, not Latin-1 / "
                                           f"Windows-1252)") from None
    raw = parse_yaml(text, what, str(path), p.name)
    if raw is None:
        state = "empty" if not text.strip() else "only comments"
        raise ConfigError(what, str(path), f"a YAML mapping of settings (the file is {state})")
    if not isinstance(raw, dict):
        raise ConfigError(what, type(raw).__name__, "a YAML mapping at the top level")
    check_finite(raw)
    return raw


def _read_bytes(p: Path, what: str) -> bytes:
    """The bytes of a YAML text file; missing, directory, unreadable, huge and binary files are refused."""
    if p.is_dir():
        raise ConfigError(what, str(p), "a YAML file (this is a directory)")
    if not p.is_file():
        raise ConfigError(what, str(p), "an existing YAML file")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(what, str(p), f"a YAML file of at most {MAX_YAML_BYTES:,} bytes (this one has {size:,})")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(what, str(p), f"a readable YAML file ({e.strerror or e})") from None
    if NUL in data:
        raise ConfigError(what, str(p), f"a YAML text file (this one holds binary data: a NUL byte at position "
                                        f"{data.index(NUL)})")
    return data


def check_finite(tree: Any, path: tuple = ()) -> None:
    """Refuse inf and NaN anywhere in a config or space tree, free-form dicts (options, kwargs, params) included."""
    if isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(_field_name(path), tree, FINITE)
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        check_finite(v, path + (k,))
