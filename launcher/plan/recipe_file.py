"""Reading a recipe: TOML with size and nesting limits, --set overrides, validation errors as one line that
names the file, key and line, path resolution, writing a resolved recipe back as TOML."""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import (
    BaseModel,
    ValidationError,
)

from launcher.errors import RecipeError, UserError
from launcher.plan.bundled import names_hint, recipe_path
from launcher.plan.chat_templates import MAX_TEMPLATE_BYTES, is_template_file
from launcher.plan.recipe import (
    SCHEMA_KEYS,
    Recipe,
    is_jinja_template,
    is_section,
    override_label,
    recipe_to_dict,
    short_value,
)
from launcher.safe_files import read_regular


def section_of(key: str, through_lists: bool = False) -> type[BaseModel] | None:
    """The section model at a dotted key; with through_lists also the item model of a list of sections
    (data.datasets -> DatasetSpec)."""
    model: type[BaseModel] = Recipe
    for part in key.split(".") if key else []:
        info = model.model_fields.get(part)
        if info is None:
            return None
        found = [a for a in (info.annotation, *(get_args(info.annotation) if through_lists else ())) if is_section(a)]
        if not found:
            return None
        model = found[0]
    return model


def suggest(key: str, shown_parent: str | None = None) -> str:
    """' (did you mean X?)' for an unknown dotted key: another tool's name for a qlaunch key first
    (key_aliases), then its siblings, then any key. shown_parent: the parent as the message shows it
    (data.datasets[0]), when the key lies inside a list."""
    from launcher.plan.key_aliases import ALIASES

    parent, _, leaf = key.rpartition(".")
    if leaf in ALIASES and ALIASES[leaf] != key:
        return f" (did you mean {ALIASES[leaf]}?)"
    section = section_of(parent, through_lists=True)
    if section is not None:
        close = difflib.get_close_matches(leaf, list(section.model_fields), n=1, cutoff=0.5)
        if close:
            prefix = parent if shown_parent is None else shown_parent
            return f" (did you mean {(prefix + '.') if prefix else ''}{close[0]}?)"
    close = difflib.get_close_matches(key, list(SCHEMA_KEYS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _key_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a dotted key in TOML text (for error messages)."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not parts:
        return None
    header = None
    lines = text.splitlines()
    leaf = parts[-1]
    for i in range(len(parts) - 1, -1, -1):
        section = ".".join(parts[:i])
        rest = parts[i:]
        cur = ""
        for n, raw in enumerate(lines, 1):
            s = raw.strip()
            m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", s)
            if m:
                cur = m.group(1).replace(" ", "")
                if cur == ".".join(parts) and header is None:
                    header = n
                continue
            dotted = ".".join(rest)
            if cur == section and re.match(rf"^{re.escape(dotted)}\s*=", s):
                return n
            if cur == section and re.match(rf"^{re.escape(leaf)}\s*=", s) and len(rest) == 1:
                return n
    return header


# A cross-field check reports at its section; its message starts with the key it is about.
_LEADING_KEY = re.compile(r"[a-z_]+(?:\.[a-z_]+)+")


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """loc up to the recipe field it is about: pydantic adds a union member's name after the field
    (('train', 'micro_batch', 'int'), ('lora', 'target_modules', "literal['all-linear']"))."""
    model: type[BaseModel] | None = Recipe
    out: list[Any] = []
    for p in loc:
        if isinstance(p, int):
            out.append(p)
            continue
        if model is None or p not in model.model_fields:
            break
        out.append(p)
        ann = model.model_fields[p].annotation
        args = get_args(ann)
        # A section, or a list of sections (data.datasets): the next names are its fields; otherwise a leaf.
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return tuple(out)


def _error_loc(e: dict[str, Any]) -> tuple[Any, ...]:
    loc = tuple(p for p in e["loc"] if p not in ("function-after", "tagged-union"))
    if e["type"] != "extra_forbidden":  # an unknown key is not in the schema: keep it whole
        loc = _field_loc(loc)
    if e["type"] == "value_error":
        m = _LEADING_KEY.match(str(e.get("ctx", {}).get("error", e["msg"])))
        section = [str(p) for p in loc if not isinstance(p, int)]
        if m and m.group(0) in SCHEMA_KEYS and m.group(0).split(".")[: len(section)] == section:
            return tuple(m.group(0).split("."))
    return loc


def _shown_key(loc: tuple[Any, ...]) -> str:
    """('data', 'datasets', 0, 'weight') -> 'data.datasets[0].weight'."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


class FlagOverride(str):
    """An override that a command-line flag stands for (`--gpus 4` is launch.gpus=4): messages name the flag."""

    flag: str

    def __new__(cls, item: str, flag: str) -> FlagOverride:
        self = super().__new__(cls, item)
        self.flag = flag
        return self


def _override_for(loc: tuple[Any, ...], overrides: Sequence[str]) -> str | None:
    """The --set item that put the value at `loc` there (it set that key or a table above it); the last wins."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip().split(".")
        if parts[: len(key)] == key:
            return item
    return None


def _format_validation(err: ValidationError, source: str, text: str | None, overrides: Sequence[str] = ()) -> str:
    errors = err.errors()
    e = errors[0]
    loc = _error_loc(e)
    key = ".".join(str(p) for p in loc if not isinstance(p, int))
    where = source
    item = _override_for(loc, overrides)
    if item is not None:
        where = override_label(item)  # the value came from the command line, not from the file
    elif text is not None:
        # A key inside a list of tables (data.datasets[0].x, often an inline table) is found by its list's line.
        first_index = next((i for i, p in enumerate(loc) if isinstance(p, int)), len(loc))
        line = _key_line(text, loc) or (_key_line(text, loc[:first_index]) if first_index < len(loc) else None)
        if line:
            where = f"{source}:{line}"
    typ = e["type"]
    if typ == "extra_forbidden":
        return f"{where}: unknown key '{_shown_key(loc)}'{suggest(key, _shown_key(loc[:-1]))}"
    if typ == "missing" and loc and isinstance(loc[-1], int):  # a tuple such as train.betas given too few items
        return f"{where}: {_shown_key(loc)} is missing: {_shown_key(loc[:-1])} needs more items"
    if typ == "missing":
        info = SCHEMA_KEYS.get(key)
        doc = f" ({info.description})" if info is not None and info.description else ""
        return f"{where}: missing required key '{key}'{doc}"
    if typ == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
        return f"{where}: {msg}"
    value = e.get("input")
    shown = short_value(value) if not isinstance(value, dict) else "a table"
    # A value that fits no member of a union (int or 'auto', 'all-linear' or a list): what each would need.
    reasons = [x["msg"].lower() for x in errors if _error_loc(x) == loc and x["type"] not in ("missing", "value_error")]
    if typ == "finite_number":
        reasons = ["must be a finite number (inf and nan are not allowed)"]
    return f"{where}: {_shown_key(loc) or 'recipe'} = {shown}: {' or '.join(dict.fromkeys(reasons))}"


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays/tables nest deeper than `limit` (checked without recursion, so depth cannot crash it)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth >= limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 0.0002). Values are TOML literals; bare words are strings."""
    label = override_label(item)
    if "=" not in item:
        raise RecipeError(f"{label}: expected KEY=VALUE, e.g. --set train.lr=2e-4")
    key, raw = (s.strip() for s in item.split("=", 1))
    if not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise RecipeError(f"{label}: bad key {short_value(key)}; keys look like section.field")
    if key not in SCHEMA_KEYS:
        raise RecipeError(f"{label}: unknown key '{key}'{suggest(key)}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except RecursionError:
        raise RecipeError(f"{label}: the value nests arrays or tables too deeply") from None
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z0-9_\-./:~][A-Za-z0-9_\-./:~+]*", raw) and raw not in ("true", "false"):
            value = raw  # a bare word such as a path or a backend name
        else:
            raise RecipeError(
                f"{label}: {short_value(raw)} is not a TOML value (strings in quotes, e.g. --set model.path='\"x\"')"
            ) from None
    if _too_deep(value, MAX_NESTING):
        raise RecipeError(f"{label}: the value nests arrays or tables more than {MAX_NESTING} levels deep")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        cur = out
        for part in path[:-1]:
            nxt = cur.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {short_value(item)}: '{part}' is not a table")
            cur = nxt
        cur[path[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def validate(
    data: dict[str, Any], source: str = "<recipe>", text: str | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """The recipe model; an invalid value is one line naming the file and line, or the --set item it came from."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, source, text, overrides)) from None


# A recipe is a few kilobytes (a long chat template, tens); the caps keep a wrong path or a crafted file
# from filling memory or recursing until Python's stack gives out (tomllib parses nesting recursively).
MAX_RECIPE_BYTES = 4 * 2**20

MAX_NESTING = 32


def _not_found(path: str | Path) -> RecipeError:
    return RecipeError(f"{path}: no such recipe file, nor a bundled recipe{names_hint(str(path))}")


def _read_recipe_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file of at most MAX_RECIPE_BYTES; one line naming the path otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (forever).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(path) from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory, not a recipe file (give a .toml file)") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot open the recipe ({err.strerror or type(err).__name__})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise RecipeError(f"{path}: is a directory, not a recipe file (give a .toml file)")
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(f"{path}: not a regular file (a FIFO, socket or device); give a recipe .toml file")
        chunks, size = [], 0
        while size <= MAX_RECIPE_BYTES and (chunk := os.read(fd, 1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {st.st_size} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES})")
        return b"".join(chunks)
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err.strerror or type(err).__name__})") from None
    finally:
        os.close(fd)


def _toml_error(err: tomllib.TOMLDecodeError) -> str:
    """tomllib's message, without the characters of the file it quotes ("Illegal character '\\x00'")."""
    return re.sub(r"(character) (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", r"\1", str(err))


def read_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    raw = _read_recipe_bytes(path)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text ({err.reason}); a recipe is a UTF-8 TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib puts "(at line L, column C)" at the end of its message.
        raise RecipeError(f"{path}: TOML syntax error: {_toml_error(err)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: arrays or inline tables nest too deeply for a recipe") from None
    if _too_deep(data, MAX_NESTING):
        raise RecipeError(
            f"{path}: arrays or tables nest more than {MAX_NESTING} levels deep; no recipe key needs that"
        )
    return data, text


# Paths a recipe may name that are not local: hub ids look like org/name (huggingface_hub's form), and a
# dataset path with a data file's suffix is never one (data.FILE_KINDS).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")

PATH_KEYS = ("model.path", "model.tokenizer", "data.datasets", "data.val_path", "data.chat_template")


def _set_on_command_line(key: str, overrides: list[str]) -> bool:
    """Whether a --set item set `key` or a table above it."""
    return any(key == k or key.startswith(k + ".") for k in (o.split("=", 1)[0].strip() for o in overrides))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe file at PATH, or the bundled recipe PATH names (tiny-cpu), with the overrides applied,
    validated, and its local paths made absolute."""
    path = recipe_path(path)
    data, text = read_toml(path)
    recipe_dir = Path(path).resolve().parent
    items = list(overrides or [])
    data = apply_overrides(data, items)
    recipe = validate(data, str(path), text, items)
    return resolve_paths(recipe, recipe_dir, {k for k in PATH_KEYS if _set_on_command_line(k, items)})


def resolve_path(s: str | None, base: Path, dataset: bool = False) -> str | None:
    """A local path made absolute against `base` only (the current directory is never tried unless it is
    base); absolute and ~ paths as they are. A relative path that does not exist under base and has the
    form of a hub id (org/name) stays as written: it is a hub id."""
    if s is None:
        return None
    p = Path(s).expanduser()
    if not p.is_absolute():
        candidate = base / p
        hub = HUB_ID.fullmatch(s) and not (dataset and p.suffix.lower() in DATA_FILE_SUFFIXES)
        if hub and not candidate.exists():
            return s
        p = candidate
    return str(p.resolve()) if p.exists() else os.path.normpath(p)


def resolve_paths(recipe: Recipe, base: Path, from_command_line: set[str] | frozenset[str] = frozenset()) -> Recipe:
    """Local paths become absolute so the run dir's copy works from anywhere.

    Relative paths written in the recipe file are relative to the recipe's directory (`base`); those given
    with --set (keys in `from_command_line`, of PATH_KEYS) to the current directory, where they were typed.
    """
    cwd = Path.cwd()

    def fix(key: str, s: str | None, dataset: bool = False) -> str | None:
        return resolve_path(s, cwd if key in from_command_line else base, dataset)

    m, d = recipe.model, recipe.data
    model = m.model_copy(update={"path": fix("model.path", m.path), "tokenizer": fix("model.tokenizer", m.tokenizer)})
    ds = [x.model_copy(update={"path": fix("data.datasets", x.path, True)}) for x in d.datasets]
    data = d.model_copy(update={"datasets": ds, "val_path": fix("data.val_path", d.val_path, True)})
    if d.chat_template is not None and is_template_file(d.chat_template):
        where = cwd if "data.chat_template" in from_command_line else base
        data = data.model_copy(update={"chat_template": read_template_file(d.chat_template, where)})
    return recipe.model_copy(update={"model": model, "data": data})


def read_template_file(value: str, base: Path) -> str:
    """The Jinja text of data.chat_template's file (relative to `base`), checked as the recipe checks text."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    what = "chat template file (data.chat_template)"
    if not path.exists():
        raise UserError(f"data.chat_template = {value!r}: {path} does not exist (a relative name is read from {base})")
    raw = read_regular(path, what, MAX_TEMPLATE_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: the {what} is not UTF-8 text") from None
    if not is_jinja_template(text):
        raise UserError(f"{path}: the {what} holds no Jinja ('{{{{' or '{{%'); it must be a chat template's text")
    return text


def dump_toml(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as TOML."""
    return _to_toml(recipe_to_dict(recipe))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's string escapes are valid TOML basic-string escapes (newlines in chat templates included);
        # TOML also wants DEL escaped.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _to_toml(d: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in d.items():
        if v is None:
            lines.append(f"# {k} = (unset)")
        elif isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, items in arrays:
        for item in items:
            out += f"\n\n[[{prefix}{k}]]\n" + _to_toml(item, f"{prefix}{k}.")
    for k, v in tables:
        out += f"\n\n[{prefix}{k}]\n" + _to_toml(v, f"{prefix}{k}.")
    return out.strip("\n") + "\n"
