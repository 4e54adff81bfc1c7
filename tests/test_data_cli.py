"""Bad data through the real CLI: exit code 2, one line naming the file and line/row, no run directory."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import BASE_RECIPE, TINY_DATA, assert_one_line_error, run_cli

CHAT_OK = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# name -> (file name, file content writer, extra [data] lines, expected message after "<tmp>/")
CASES = {
    # Past the rows check() reads: found when the launcher tokenizes everything, before spawning.
    "malformed JSON past the rows the quick check reads": (
        "late.jsonl",
        lambda p: p.write_text('{"instruction": "i", "output": "o"}\n' * 2100 + '{"instruction": 1\n'),
        "",
        "late.jsonl:2101: malformed JSON (Expecting ',' delimiter at column 18)",
    ),
    "malformed JSON": (
        "bad.jsonl",
        lambda p: p.write_text('{"instruction": "i", "output": "o"}\n{"instruction": "i", "output": "o"}\n{"instr\n'),
        "",
        "bad.jsonl:3: malformed JSON (Unterminated string starting at column 2)",
    ),
    "missing column": (
        "nocol.jsonl",
        lambda p: _jsonl(p, [{"instruction": "i", "response": "o"}]),
        "",
        "nocol.jsonl: missing column 'output' (data.output_column); its columns are: instruction, response",
    ),
    "wrong type": (
        "type.jsonl",
        lambda p: _jsonl(p, [{"instruction": "i", "output": "o"}, {"instruction": ["i"], "output": "o"}]),
        "",
        "type.jsonl:2: column 'instruction' must be a string, got a list (data.instruction_column)",
    ),
    "empty": ("empty.jsonl", lambda p: p.write_text(""), "", "empty.jsonl: the dataset is empty"),
    "empty after filtering": (
        "long.jsonl",
        lambda p: _jsonl(p, [{"instruction": "i", "output": "word " * 100}]),
        'overlong = "drop"',
        "long.jsonl: no usable samples left of 1 rows: 1 longer than data.seq_len = 64 dropped",
    ),
    "unknown role": (
        "role.jsonl",
        lambda p: _jsonl(p, [{"messages": CHAT_OK}, {"messages": [{"role": "human", "content": "q"}]}]),
        'format = "chat"',
        "role.jsonl:2: message 1 has unknown role 'human' (expected one of system, user, assistant, tool)",
    ),
    "template renders nothing": (
        "chat.jsonl",
        lambda p: _jsonl(p, [{"messages": CHAT_OK}]),
        'format = "chat"\nchat_template = "{% if false %}x{% endif %}"',
        "chat.jsonl:1: the chat template rendered nothing for this conversation",
    ),
    "file not found": ("missing.jsonl", None, "", "missing.jsonl: file not found (data.datasets[0].path)"),
    "unsupported extension": (
        "data.tsv",
        lambda p: p.write_text("instruction\toutput\ni\to\n"),
        "",
        "data.tsv: unsupported file type '.tsv' (data.datasets[0].path)",
    ),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case's CLI at once (4 at a time): each is mostly interpreter and torch start-up."""
    base = tmp_path_factory.mktemp("bad-data")

    def one(case: str):
        name, write, extra, _ = CASES[case]
        tmp = base / case.replace(" ", "-")
        tmp.mkdir()
        if write is not None:
            write(tmp / name)
        text = BASE_RECIPE.replace(str(TINY_DATA / "train.jsonl"), str(tmp / name))
        # Keys set after the format line of [data] (TOML forbids a key twice, so a new format replaces it).
        lines = extra if "format" in extra else f'format = "alpaca"\n{extra}'
        (tmp / "recipe.toml").write_text(text.replace('format = "alpaca"', lines))
        runs = tmp / "runs"
        res = run_cli("run", str(tmp / "recipe.toml"), "--set", f"log.runs_dir='{runs}'", timeout=300)
        return tmp, runs, res

    with ThreadPoolExecutor(4) as ex:
        return dict(zip(CASES, ex.map(one, CASES), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_exits_2_with_one_line_and_writes_nothing(results, case):
    tmp, runs, res = results[case]
    expected = CASES[case][3]
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("qlaunch: error:")]
    assert len(errors) == 1, out
    assert errors[0].startswith(f"qlaunch: error: {tmp}/{expected}"), out
    # Every row is read before a run directory exists (the launcher tokenizes the whole data), and a bad
    # row leaves nothing behind: no run directory, no cache entry, no error marker.
    assert not runs.exists() or not any(runs.iterdir()), "a bad data file must not create a run directory"


@pytest.mark.parametrize(
    "write,extra,expect",
    [
        # datasets logged "Failed to read file ... with error ..." (quoting the row) before qlaunch's line.
        (
            lambda p: p.write_text("instruction,output\n" + "i,o\n" * 2500 + "SECRET1,SECRET2,SECRET3\n"),
            [],
            ["data.csv", "line 2502 has 3 fields, the header has 2 columns"],
        ),
        # Fewer packed rows than the global batch was found by every rank, after the run directory existed.
        (
            lambda p: p.write_text("instruction,output\nSay a.,a\nSay b.,b\nSay c.,c\n"),
            ["--set", "data.packing=false", "--set", "train.global_batch=8"],
            ["data.datasets: the training data packs into 3 rows", "fewer than train.global_batch = 8"],
        ),
    ],
)
def test_data_problems_found_before_spawning_are_exactly_one_stderr_line(tmp_path, write, extra, expect):
    write(tmp_path / "data.csv")
    (tmp_path / "recipe.toml").write_text(
        BASE_RECIPE.replace(str(TINY_DATA / "train.jsonl"), str(tmp_path / "data.csv"))
    )
    runs = tmp_path / "runs"
    r = run_cli("run", str(tmp_path / "recipe.toml"), "--set", f"log.runs_dir='{runs / 'r'}'", *extra, timeout=300)
    assert_one_line_error(r, expect, runs / "r" / "t")
    assert "SECRET" not in r.stderr + r.stdout
