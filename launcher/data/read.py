"""Reading a dataset's rows: sources classified from the recipe (a file, a saved dataset, a hub id), loaded,
the split picked, rows streamed with where each came from (file:line or row index)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UserError

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    from launcher.plan.recipe import DataConfig
from launcher.data.json_rows import read_json_rows
from launcher.data.local import check_local
from launcher.data.source import CHUNK_ROWS, FILE_KINDS, HUB_ID_PATTERN, Source, error_cause, load_error


def classify(path: str, split: str, key: str) -> Source:
    """File / saved dataset / directory of data files / hub name; raises for missing or unsupported files."""
    p = Path(path).expanduser()
    if not p.is_absolute() and HUB_ID_PATTERN.fullmatch(path) and p.suffix.lower() not in FILE_KINDS:
        # A recipe's local paths are absolute by now (recipe.resolve_paths); a relative org/name is a hub id,
        # and a folder of that name in the current directory must not stand in for it.
        return Source(path, "hub", split, key)
    try:
        mode = p.stat().st_mode  # follows symlinks: a link to a data file is that file
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as err:
        raise UserError(f"{path}: cannot access ({err.strerror or type(err).__name__}) ({key})") from None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # Reading a FIFO would wait for a writer forever; a device or socket is no dataset either.
        raise UserError(f"{path}: not a regular file (a FIFO, socket or device) ({key}); give a data file or directory")
    if mode is not None and stat.S_ISREG(mode):
        kind = FILE_KINDS.get(p.suffix.lower())
        if kind is None:
            raise UserError(
                f"{path}: unsupported file type '{p.suffix or '(no extension)'}' ({key}); use .jsonl, .json, "
                ".parquet, .csv, .arrow, a directory written by Dataset.save_to_disk, or a hub dataset name"
            )
        return Source(str(p), kind, split, key)
    if mode is not None:
        saved = (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
        # A plain directory of data files is loaded exactly like a hub dataset repository.
        return Source(str(p), "saved" if saved else "repo", split, key)
    raise UserError(f"{path}: file not found ({key})")


def recipe_sources(cfg: DataConfig) -> tuple[list[Source], Source | None]:
    train = [classify(d.path, d.split, f"data.datasets[{i}].path") for i, d in enumerate(cfg.datasets)]
    val = classify(cfg.val_path, cfg.val_split, "data.val_path") if cfg.val_path else None
    return train, val


def source_identity(src: Source) -> list:
    """What makes a source's content change: path + size + mtime of its files (name + split for the hub)."""
    if src.kind == "hub":
        return [src.kind, src.path, src.split]
    p = Path(src.path).resolve()
    if p.is_file():
        st = p.stat()
        return [src.kind, str(p), src.split, st.st_size, st.st_mtime_ns]
    files = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and ".cache" not in f.relative_to(p).parts:
            st = f.stat()
            files.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
    return [src.kind, str(p), src.split, files]


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    # Its loaders log "Failed to read file ... with error ..." (echoing the file's bytes) before raising; the
    # exception is turned into qlaunch's one line (load_error), so the log line is only noise on stderr.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


class RowWhere:
    """Row index (0-based) of a source -> 'file:LINE' for JSON lines, 'file record N' for a JSON array,
    'file row N' otherwise. `lines`: the line of each JSON-lines record, as qlaunch's reader found them."""

    def __init__(self, src: Source, lines: list[int] | None = None):
        self.src = src
        self._lines = lines

    def __call__(self, i: int) -> str:
        if self.src.kind == "json":
            if self._lines and i < len(self._lines):
                return f"{self.src.path}:{self._lines[i]}"
            return f"{self.src.path} record {i + 1}"
        if self.src.kind == "hub":
            return f"{self.src.path} (split {self.src.split!r}) row {i + 1}"
        return f"{self.src.path} row {i + 1}"


def _pick_split(ds, src: Source):
    if isinstance(ds, dict):  # a DatasetDict (saved with several splits)
        if src.split not in ds:
            raise UserError(
                f"{src.path}: no split {src.split!r} ({src.key}); it has: {', '.join(sorted(ds))} "
                "(set the split in the recipe)"
            )
        return ds[src.split]
    return ds


def _open_arrow(src: Source, ds_lib):
    """An Arrow file or a saved dataset, memory-mapped where it lies (nothing converted or copied)."""
    if src.kind == "arrow":
        return ds_lib.Dataset.from_file(src.path)
    return _pick_split(ds_lib.load_from_disk(src.path), src)


def load_source(src: Source):
    """The whole source as a datasets.Dataset (memory-mapped Arrow)."""
    ds_lib = _datasets()
    check_local(src, ds_lib)
    try:
        if src.kind in ("arrow", "saved"):
            ds = _open_arrow(src, ds_lib)
        elif src.kind in ("repo", "hub"):
            ds = ds_lib.load_dataset(src.path, split=src.split)
        else:
            ds = ds_lib.load_dataset(src.kind, data_files=src.path, split="train")
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - every loader failure is about the user's data
        raise load_error(src, err) from None
    if len(ds) == 0:
        raise UserError(f"{src.path}: the dataset is empty (no rows)")
    return ds


def dataset_rows(ds, src: Source) -> Iterator[tuple[int, dict]]:
    """(row index, row) of a loaded dataset. Its values are decoded lazily, batch by batch: a failure there
    (bytes that are not UTF-8, a corrupt page) is one line naming the source and the rows it was reading."""
    i = 0
    batches = ds.iter(batch_size=CHUNK_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - a value the loader cannot decode is the user's data
            rows = f"rows {i + 1}-{i + CHUNK_ROWS}" if src.kind != "hub" else f"(split {src.split!r}) rows {i + 1}-"
            raise UserError(f"{src.path} {rows}: could not read the data ({src.key}): {error_cause(err)}") from None
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        for j in range(n):
            yield i, {c: batch[c][j] for c in cols}
            i += 1


def peek_rows(src: Source, limit: int) -> tuple[list[dict], RowWhere, bool] | None:
    """Up to `limit` rows for `check`, writing nothing (no datasets cache). None: cannot peek (hub)."""
    if src.kind == "hub":
        return None
    if src.kind == "json":
        rows, lines, complete = read_json_rows(Path(src.path), limit)
        return rows, RowWhere(src, lines), complete
    ds_lib = _datasets()
    check_local(src, ds_lib)
    try:
        if src.kind in ("arrow", "saved"):
            ds = _open_arrow(src, ds_lib)
        else:
            # Streaming reads through the same builders (and the same type inference) as training does,
            # without converting the whole file into the datasets cache.
            if src.kind == "repo":
                stream = ds_lib.load_dataset(src.path, split=src.split, streaming=True)
            else:
                stream = ds_lib.load_dataset(src.kind, data_files=src.path, split="train", streaming=True)
            rows = []
            for row in stream:
                if len(rows) >= limit:
                    return rows, RowWhere(src), False
                rows.append(row)
            return rows, RowWhere(src), True
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise load_error(src, err) from None
    rows = ds.select(range(min(limit, len(ds)))).to_list()
    return rows, RowWhere(src), len(ds) <= limit
