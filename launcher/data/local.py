"""Local datasets stay inside their directory: saved datasets and data directories list only plain files within it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UserError
from launcher.safe_files import open_regular, plain_file_name, shown

if TYPE_CHECKING:  # annotations only: packing and sampling import without pydantic (GPU hosts, tools)
    pass
from launcher.data.json_rows import json_records
from launcher.data.source import Source, load_error, value_kind


def _inside(root: Path, path: Path, src: Source, what: str) -> None:
    """PATH, with every symlink followed, is ROOT or below it; else one line naming the escaping file."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise UserError(
            f"{src.path}: {what} {shown(str(path))} lies outside the dataset directory ({src.key}); a local "
            "dataset may only read files inside its own directory"
        )


def _saved_files(src: Source) -> list[Path]:
    """The files load_from_disk reads, checked: split folders named by dataset_dict.json and data files named
    by each state.json's _data_files are plain names, inside the directory, regular files."""
    from launcher.safe_files import read_json_object

    d = Path(src.path)
    root = Path(os.path.realpath(d))
    folders = [d]
    if os.path.lexists(d / "dataset_dict.json"):
        splits = read_json_object(d / "dataset_dict.json", "saved dataset's split list").get("splits")
        if not isinstance(splits, list) or not splits or not all(plain_file_name(x) for x in splits):
            raise UserError(
                f"{d / 'dataset_dict.json'}: 'splits' must be a non-empty list of folder names inside {d} ({src.key})"
            )
        folders = [d / x for x in splits]
    files = []
    for folder in folders:
        _inside(root, folder, src, "split folder")
        state_path = folder / "state.json"
        state = read_json_object(state_path, "saved dataset state")
        entries = state.get("_data_files")
        if not isinstance(entries, list) or not entries:
            raise UserError(f"{state_path}: '_data_files' must be a non-empty list of the split's Arrow files")
        for entry in entries:
            name = entry.get("filename") if isinstance(entry, dict) else None
            if not plain_file_name(name):
                what = shown(name) if isinstance(name, str) else value_kind(name)
                raise UserError(
                    f"{state_path}: _data_files names {what}; a saved dataset's files are plain file names "
                    f"inside its folder ({src.key})"
                )
            files.append(folder / name)
        for extra in ("state.json", "dataset_info.json"):
            if os.path.lexists(folder / extra):
                files.append(folder / extra)
    for f in files:
        _inside(root, f, src, "file")
        os.close(open_regular(f, "saved dataset file"))
    return files


def _repo_files(src: Source, ds_lib) -> list[Path]:
    """The data files datasets would load from a directory of data files (its README.md `configs` may name
    any path), checked: inside the directory, regular files, and JSON ones read through qlaunch's reader."""
    try:
        config = ds_lib.load_dataset_builder(src.path).config
    except Exception as err:  # noqa: BLE001
        raise load_error(src, err) from None
    data_files = getattr(config, "data_files", None) or {}
    root = Path(os.path.realpath(src.path))
    files = [Path(str(f).removeprefix("file://")) for split in data_files.values() for f in split]
    for f in files:
        _inside(root, f, src, "data file")
        os.close(open_regular(f, "data file"))
    for f in files:
        if f.suffix.lower() in (".json", ".jsonl"):
            for _ in json_records(f):  # pyarrow's JSON reader must not see a file qlaunch has not read
                pass
    return files


def check_local(src: Source, ds_lib) -> None:
    if src.kind == "saved":
        _saved_files(src)
    elif src.kind == "repo":
        _repo_files(src, ds_lib)
