"""Tests of bench_las.py on tiny shapes: correctness column, JSON records and argument checks."""

import json

import pytest

import bench_las


def test_bench_rows_and_json(tmp_path):
    out = tmp_path / "bench.jsonl"
    argv = ["--lengths", "64", "--heads", "2", "--head-dim", "8", "--repeats", "1", "--chunk-size", "16",
            "--paths", "plain", "sdpa", "reference", "fast", "chunk", "--json", str(out)]
    rows = bench_las.main(argv)

    assert [row.path for row in rows] == ["plain", "sdpa", "reference", "fast", "chunk"]
    errors = {row.path: row.max_error for row in rows}
    assert errors["plain"] is None
    assert errors["reference"] == 0.0
    assert errors["fast"] < 1e-5
    assert errors["chunk"] < 1e-5
    assert all(row.train_ms > 0 and row.forward_ms > 0 for row in rows)

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(rows)
    assert records[3]["path"] == "fast"
    assert records[3]["length"] == 64


def test_bench_skips_paths_over_budget():
    rows = bench_las.main(["--lengths", "256", "--repeats", "1", "--paths", "plain", "chunk", "--chunk-size", "16",
                           "--max-memory-gb", "0.006"])
    plain, chunk = rows
    assert plain.forward_ms is None
    assert plain.note.startswith("skipped: needs about")
    assert chunk.forward_ms > 0


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "--lengths must be at least 1"),
    (["--pool-size", "4"], "--pool-size must be a positive odd integer"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--json", "/no/such/folder/x.jsonl"], "does not exist"),
])
def test_bench_rejects_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_las.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
