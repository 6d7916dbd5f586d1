"""Tests of train_lra.py: the ListOps generator, the readers of every LRA file format, batching,
the schedule, the model's padding behaviour, end-to-end runs of all six tasks on tiny files, exact
resume, a 2-process torchrun run and the error messages.

Every fixture is written into pytest's tmp_path in the official format. Models are tiny (width 16,
one layer, a few steps) so the file runs in a few minutes on 2 CPU cores:

    python -m pytest -q test_train_lra.py
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import train_lra
from train_lra import (
    LISTOPS_TOKEN_IDS,
    ListOpsGenerator,
    TaskData,
    TrainConfig,
    UsageError,
    generate_listops,
    lr_factor,
    main,
    warmup_steps_from,
)

SCRIPT = Path(train_lra.__file__).resolve()
TINY_MODEL = ["--dim", "16", "--layers", "1", "--heads", "2", "--device", "cpu"]


# ----------------------------------------------------------------------------------------------------
# An independent reading of the official printed ListOps form
#
# pair := "(" head tail ")", head := operator | pair, tail := digit | pair | "]".
# An operator with n arguments is n + 1 nested pairs; the outermost one has tail "]".


def parse_printed(tokens: list[str], position: int = 0):
    """Parse one pair starting at tokens[position]; return (tree, next position).

    A tree is ("op", operator, [arguments]) once closed by "]", else ("open", operator, [arguments]).
    """
    assert tokens[position] == "(", f"expected '(' at {position}, found {tokens[position]!r}"
    position += 1
    if tokens[position] == "(":
        head, position = parse_printed(tokens, position)
        assert head[0] == "open", "a closed operator cannot take more arguments"
    else:
        assert tokens[position] in ("[MIN", "[MAX", "[MED", "[SM"), tokens[position]
        head = ("open", tokens[position], [])
        position += 1
    tail = tokens[position]
    if tail == "]":
        position += 1
        tree = ("op", head[1], head[2])
    elif tail == "(":
        argument, position = parse_printed(tokens, position)
        assert argument[0] == "op", "an argument must be a closed operator or a digit"
        tree = ("open", head[1], head[2] + [argument])
    else:
        assert len(tail) == 1, tail
        assert tail.isdigit(), tail
        position += 1
        tree = ("open", head[1], head[2] + [int(tail)])
    assert tokens[position] == ")", f"expected ')' at {position}, found {tokens[position]!r}"
    return tree, position + 1


def evaluate_tree(tree) -> int:
    if isinstance(tree, int):
        return tree
    _, operator, arguments = tree
    values = [evaluate_tree(argument) for argument in arguments]
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(statistics.median(values))  # values are >= 0, so int() is the floor
    return sum(values) % 10


def count_length(tree) -> int:
    if isinstance(tree, int):
        return 1
    return 2 + sum(count_length(argument) for argument in tree[2])


def tree_depth(tree) -> int:
    if isinstance(tree, int):
        return 1
    return 1 + max(tree_depth(argument) for argument in tree[2])


# ----------------------------------------------------------------------------------------------------
# Fixture writers: tiny files in each official format


def listops_row(operator: str, digits: list[int]) -> tuple[str, int]:
    """Return the printed form and value of a one-level ListOps expression."""
    printed = " ".join(["("] * (len(digits) + 1) + [operator, str(digits[0])]
                       + [token for digit in digits[1:] for token in (")", str(digit))] + [")", "]", ")"])
    tree, _ = parse_printed(printed.split())
    return printed, evaluate_tree(tree)


def write_listops(root: Path, sizes=(64, 12, 9), seed: int = 0) -> Path:
    """Write listops-1000/basic_{train,val,test}.tsv with nested expressions and return root."""
    folder = root / "listops-1000"
    folder.mkdir(parents=True)
    splits = generate_listops(seed, sizes, 8, 40, progress=False)
    for name, rows in zip(("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"), splits):
        train_lra.write_listops_tsv(folder / name, rows)
    return root


def write_imdb(root: Path, reviews: dict) -> Path:
    """Write aclImdb/<split>/<pos|neg>/<i>_7.txt; reviews maps (split, label) to lists of bytes."""
    for (split, label), texts in reviews.items():
        folder = root / "aclImdb" / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for index, text in enumerate(texts):
            (folder / f"{index}_7.txt").write_bytes(text)
    return root / "aclImdb"


def default_reviews() -> dict:
    rng = np.random.default_rng(0)

    def review(label: str) -> bytes:
        word = b"great film " if label == "pos" else b"dull movie "
        return word * int(rng.integers(2, 6)) + b"<br /><br />the end."

    return {(split, label): [review(label) for _ in range(count)]
            for split, count in (("train", 12), ("test", 5)) for label in ("pos", "neg")}


def write_aan(root: Path, rows_per_split=(24, 6, 7)) -> Path:
    """Write lra_release/tsv_data/new_aan_pairs.*.tsv: label, id1, id2, text1, text2, no quoting."""
    folder = root / "lra_release" / "tsv_data"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, count in zip(train_lra.AAN_SPLIT_FILES, rows_per_split):
        lines = []
        for index in range(count):
            label = index % 2
            text1 = f'paper {index} says "attention {rng.integers(100)}'
            text2 = f"cites {index} with a lone \" quote" if label else f"other {index}"
            lines.append(f"{label}.0\tid{index}a\tid{index}b\t{text1}\t{text2}")
        (folder / name).write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return root


def write_cifar(root: Path, train_per_batch: int = 6, test_count: int = 7) -> Path:
    """Write cifar-10-batches-py with pickled dicts of channel-major uint8 rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    names = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_count if name == "test_batch" else train_per_batch
        batch = {b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
                 b"labels": [int(label) for label in rng.integers(0, 10, size=count)]}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    return root


def write_pathfinder(folder: Path, side: int, count: int, empty: tuple = ()) -> list[int]:
    """Write metadata/<n>.npy as text lines and imgs/<n>/sample_<k>.png; return the labels written.

    Images listed in `empty` are zero-byte files. Metadata lines follow the release:
    folder, file name, a field this loader ignores, the label, then more fields.
    """
    rng = np.random.default_rng(3)
    labels = []
    for file_index in range(2):
        (folder / "metadata").mkdir(parents=True, exist_ok=True)
        (folder / "imgs" / str(file_index)).mkdir(parents=True, exist_ok=True)
        lines = []
        for sample in range(count // 2):
            label = int((sample + file_index) % 2)
            name = f"sample_{sample}.png"
            path = folder / "imgs" / str(file_index) / name
            if (file_index, sample) in empty:
                path.write_bytes(b"")
            else:
                pixels = rng.integers(0, 256, size=(side, side), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(path)
            lines.append(f"imgs/{file_index} {name} 0 {label} 14 1.8 1 0 5 2")
            labels.append(label)
        (folder / "metadata" / f"{file_index}.npy").write_text("\n".join(lines) + "\n")
    return labels


def read_records(out_dir: Path) -> list[dict]:
    return train_lra.read_metrics(out_dir / "metrics.jsonl")


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SCRIPT.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


# ----------------------------------------------------------------------------------------------------
# The ListOps generator


def test_generator_official_form_and_labels():
    examples = generate_listops(seed=5, sizes=(150, 30, 20), min_length=20, max_length=120, progress=False)
    sources = [source for split in examples for source, _ in split]
    assert [len(split) for split in examples] == [150, 30, 20]
    assert len(set(sources)) == len(sources), "duplicate expressions across or within splits"

    for split in examples:
        for source, label in split:
            tokens = source.split()
            tree, end = parse_printed(tokens)
            assert end == len(tokens), "trailing tokens after the outer expression"
            assert tree[0] == "op"
            assert evaluate_tree(tree) == label
            length = count_length(tree)
            assert 20 < length < 120
            assert length == sum(token not in ("(", ")") for token in tokens)
            assert tree_depth(tree) <= 10


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), min_length=st.integers(2, 30), span=st.integers(5, 60))
def test_generator_length_filter_is_strict(seed, min_length, span):
    generator = ListOpsGenerator(seed, min_length, min_length + span)
    accepted = 0
    for _ in range(200):
        sample = generator.sample()
        if sample is None:
            continue
        source, label, length = sample
        accepted += 1
        assert min_length < length < min_length + span
        tree, _ = parse_printed(source.split())
        assert count_length(tree) == length
        assert evaluate_tree(tree) == label


def test_listops_value_rules():
    assert train_lra.listops_value("[MED", [2, 9]) == 5  # floor of 5.5
    assert train_lra.listops_value("[MED", [1, 4, 7]) == 4
    assert train_lra.listops_value("[MED", [0, 9, 8, 1]) == 4  # floor of (1 + 8) / 2
    assert train_lra.listops_value("[SM", [9, 8, 7]) == 4
    assert train_lra.listops_value("[MIN", [3, 1, 2]) == 1
    assert train_lra.listops_value("[MAX", [3, 1, 2]) == 3


def test_printed_form_of_one_operator():
    printed, value = listops_row("[MAX", [2, 9])
    assert printed == "( ( ( [MAX 2 ) 9 ) ] )"
    assert value == 9
    assert train_lra.encode_listops(printed).tolist() == [
        LISTOPS_TOKEN_IDS["[MAX"], LISTOPS_TOKEN_IDS["2"], LISTOPS_TOKEN_IDS["9"], LISTOPS_TOKEN_IDS["]"]
    ]


def test_generate_command_writes_crlf_tsv(tmp_path, capsys):
    out = tmp_path / "generated"
    argv = ["generate-listops", "--out", out, "--train-size", 40, "--val-size", 5, "--test-size", 6,
            "--min-length", 10, "--max-length", 60, "--seed", 3]
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0
    sizes = {"basic_train.tsv": 40, "basic_val.tsv": 5, "basic_test.tsv": 6}
    sources = []
    for name, size in sizes.items():
        content = (out / name).read_bytes()
        assert content.startswith(b"Source\tTarget\r\n")
        lines = content.split(b"\r\n")
        assert lines[-1] == b"", "file must end with CRLF"
        assert b"\n" not in b"".join(lines), "every line must end with CRLF"
        assert len(lines) - 2 == size
        for line in lines[1:-1]:
            source, label = line.decode().split("\t")
            tree, _ = parse_printed(source.split())
            assert evaluate_tree(tree) == int(label)
            assert 10 < count_length(tree) < 60
            sources.append(source)
    assert len(set(sources)) == len(sources)

    # A second call reuses the files and leaves them untouched.
    before = {name: (out / name).stat().st_mtime_ns for name in sizes}
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0
    assert "nothing generated" in stdout
    assert {name: (out / name).stat().st_mtime_ns for name in sizes} == before


def test_generation_is_seeded():
    first = generate_listops(seed=11, sizes=(20, 2, 2), min_length=10, max_length=50, progress=False)
    second = generate_listops(seed=11, sizes=(20, 2, 2), min_length=10, max_length=50, progress=False)
    other = generate_listops(seed=12, sizes=(20, 2, 2), min_length=10, max_length=50, progress=False)
    assert first == second
    assert first != other


# ----------------------------------------------------------------------------------------------------
# Readers


def test_listops_reader_crlf_parentheses_and_lf(tmp_path):
    folder = tmp_path / "listops-1000"
    folder.mkdir()
    rows = [listops_row("[MAX", [2, 9]), listops_row("[SM", [7, 8, 9]), listops_row("[MED", [0, 9, 8, 1])]
    for name in train_lra.LISTOPS_SPLIT_FILES:
        train_lra.write_listops_tsv(folder / name, rows)
    # The same rows with LF line endings read the same.
    lf_path = tmp_path / "lf.tsv"
    lf_path.write_text("Source\tTarget\n" + "".join(f"{source}\t{label}\n" for source, label in rows))

    data = train_lra.read_listops(tmp_path, max_length=2000)
    split = data.val
    assert split.labels.tolist() == [9, 4, 4]
    ids = LISTOPS_TOKEN_IDS
    assert split.sequences[1].tolist() == [ids["[SM"], ids["7"], ids["8"], ids["9"], ids["]"]]
    assert all(ids["]"] in sequence.tolist() for sequence in split.sequences)
    lf = train_lra.read_listops_split(lf_path, 2000)
    assert [sequence.tolist() for sequence in lf.sequences] == [sequence.tolist() for sequence in split.sequences]
    assert data.vocab_size == 16
    assert data.num_classes == 10


@pytest.mark.parametrize("layout", ["", "lra_release", "lra_release/lra_release", "lra_release/lra_release/listops-1000"])
def test_listops_root_outer_inner_or_task_folder(tmp_path, layout):
    write_listops(tmp_path / layout.replace("/listops-1000", ""), sizes=(4, 2, 2))
    given = tmp_path / layout
    data = train_lra.read_listops(given, max_length=2000)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)


def test_text_lengths_and_utf8(tmp_path, capsys):
    lengths = [10, 4095, 4096, 5000]
    reviews = {("train", "pos"): [b"a" * n for n in lengths], ("train", "neg"): ["caf\u00e9".encode()],
               ("test", "pos"): [b"x" * 3], ("test", "neg"): [b"y" * 4]}
    write_imdb(tmp_path, reviews)
    data = train_lra.read_text(tmp_path, max_length=4096)
    by_label = {0: [], 1: []}
    for sequence, label in zip(data.train.sequences, data.train.labels):
        by_label[int(label)].append(sequence)
    assert sorted(len(sequence) for sequence in by_label[1]) == [min(n, 4096) for n in lengths]
    cafe = by_label[0][0].tolist()
    assert cafe == [ord("c") + 1, ord("a") + 1, ord("f") + 1, 0xC3 + 1, 0xA9 + 1]
    assert len(data.val) == len(data.test) == 2, "IMDB's test split serves as validation"
    assert data.vocab_size == 257

    # Run log states the effective max length.
    out = tmp_path / "run"
    code, stdout, _ = run_main(["--task", "text", "--data-dir", tmp_path, "--out-dir", out, *TINY_MODEL,
                                "--batch-size", 2, "--max-steps", 2, "--warmup-steps", 0, "--eval-every", 2,
                                "--max-length", 4096], capsys)
    assert code == 0
    assert "effective max length 4096 tokens" in stdout
    assert "truncated to max length 4096 bytes" in stdout


def test_aan_quoting_rows_and_bytes(tmp_path):
    folder = tmp_path / "tsv_data"
    folder.mkdir()
    lines = [
        '1.0\ta1\tb1\tattention is "all\tsee "quoted text',
        '0\ta2\tb2\tplain "\t\u00e9t\u00e9 "" x',
        '1\ta3\tb3\tthird doc\tfourth "',
    ]
    raw = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    for name in train_lra.AAN_SPLIT_FILES:
        (folder / name).write_bytes(raw)
    data = train_lra.read_retrieval(tmp_path, max_length=4000)
    split = data.train
    assert len(split) == len(lines)
    assert split.labels.tolist() == [1, 0, 1]
    for (first, second), line in zip(split.sequences, lines):
        fields = line.encode("utf-8").split(b"\t")
        assert len(fields) == 5
        assert bytes((first - 1).astype(np.uint8).tolist()) == fields[3]
        assert bytes((second - 1).astype(np.uint8).tolist()) == fields[4]
    assert data.pairs


def test_dual_encoder_documents_are_independent():
    cfg = TrainConfig(dim=16, layers=1, heads=2, norm="batch", dropout=0.0, pos_embedding="learned")
    data = TaskData(None, None, None, vocab_size=257, num_classes=2, max_length=64, pairs=True)
    torch.manual_seed(0)
    model = train_lra.LRAClassifier(cfg, data).train()
    pooled = []
    model.encoder.register_forward_hook(lambda module, inputs, output: pooled.append(output.detach().clone()))

    tokens1, lengths1 = train_lra.pad_sequences([np.arange(1, 30), np.arange(5, 20)])
    tokens2, lengths2 = train_lra.pad_sequences([np.arange(1, 10), np.arange(7, 60)])
    tokens2b, lengths2b = train_lra.pad_sequences([np.arange(100, 140), np.arange(200, 203)])
    model(tokens1, lengths1, tokens2, lengths2)
    model(tokens1, lengths1, tokens2b, lengths2b)
    assert len(pooled) == 4
    assert torch.equal(pooled[0], pooled[2]), "document 1's encoding changed with document 2"
    assert not torch.equal(pooled[1], pooled[3])


def test_grayscale_pure_colours_row_major(tmp_path):
    images = []
    for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255)):
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        image[:] = colour
        images.append(image)
    ramp = np.zeros((32, 32, 3), dtype=np.uint8)
    ramp[:, :, :] = np.arange(32, dtype=np.uint8)[:, None, None] * 8  # row r has level 8 r
    ramp[0, 1] = (255, 255, 255)  # row 0, column 1
    images.append(ramp)
    planes = np.stack([image.transpose(2, 0, 1).reshape(-1) for image in images])  # CIFAR layout

    gray = train_lra.rgb_to_gray(planes)
    assert gray.shape == (4, 1024)
    assert set(gray[0].tolist()) == {76}
    assert set(gray[1].tolist()) == {150}
    assert set(gray[2].tolist()) == {29}
    assert gray[3, 1] == 255
    assert gray[3, 32 * 5 + 7] == 40, "row-major: index 32 r + c holds row r"

    # Matches PIL's own "L" conversion on random colours.
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(colours, mode="RGB").convert("L")).reshape(-1)
    assert np.array_equal(train_lra.rgb_to_gray(colours.transpose(2, 0, 1).reshape(1, -1))[0], expected)


def test_cifar_reader_split(tmp_path):
    write_cifar(tmp_path / "lra", train_per_batch=10, test_count=7)
    data = train_lra.read_image(tmp_path / "lra")
    assert (len(data.train), len(data.val), len(data.test)) == (45, 5, 7)
    assert all(len(sequence) == 1024 for sequence in data.train.sequences)
    with open(tmp_path / "lra" / "cifar-10-batches-py" / "data_batch_5", "rb") as file:
        last = pickle.load(file)
    assert data.val.labels.tolist() == last[b"labels"][-5:], "validation is the last 10% of training"
    assert data.padding_idx is None


def test_pathfinder_metadata_empty_image_nested_release(tmp_path):
    # The archive's doubled folder: the data sits in the inner root, and an outer copy exists too.
    inner = tmp_path / "lra_release" / "lra_release" / "pathfinder32" / "curv_contour_length_14"
    labels = write_pathfinder(inner, 32, 20, empty=((1, 3),))
    outer = tmp_path / "lra_release" / "pathfinder32" / "curv_contour_length_14"
    write_pathfinder(outer, 32, 6)  # a second, smaller copy one level up: the inner root wins

    data = train_lra.read_pathfinder(tmp_path, "pathfinder", progress=False)
    kept_labels = labels[:13] + labels[14:]  # image 13 (folder 1, sample 3) is empty
    assert len(data.train) + len(data.val) + len(data.test) == 19
    assert (len(data.val), len(data.test)) == (1, 1)
    assert any("1 empty or unreadable images skipped" in note for note in data.notes)
    assert any(str(inner) in note for note in data.notes)
    # Labels come from field 3, in metadata order, split by the seed-42 permutation.
    order = torch.randperm(19, generator=torch.Generator().manual_seed(42)).tolist()
    expected_train = [kept_labels[index] for index in order[:17]]
    assert data.train.labels.tolist() == expected_train

    # The task folder itself is accepted too.
    direct = train_lra.read_pathfinder(inner, "pathfinder", progress=False)
    assert direct.train.labels.tolist() == expected_train


def test_pathfinder_metadata_as_numpy_array(tmp_path):
    folder = tmp_path / "curv_contour_length_14"
    labels = write_pathfinder(folder, 32, 10)
    text_data = train_lra.read_pathfinder(folder, "pathfinder", progress=False)
    for path in (folder / "metadata").glob("*.npy"):
        rows = [line.split() for line in path.read_text().splitlines()]
        with open(path, "wb") as file:
            np.save(file, np.array(rows))
    assert (folder / "metadata" / "0.npy").read_bytes().startswith(b"\x93NUMPY")
    array_data = train_lra.read_pathfinder(folder, "pathfinder", progress=False)
    assert array_data.train.labels.tolist() == text_data.train.labels.tolist()
    assert sorted(array_data.train.labels.tolist() + array_data.val.labels.tolist()
                  + array_data.test.labels.tolist()) == sorted(labels)


def test_pathfinder_missing_lists_candidates(tmp_path):
    with pytest.raises(UsageError) as error:
        train_lra.read_pathfinder(tmp_path, "pathx", progress=False)
    message = str(error.value)
    assert str(tmp_path / "lra_release" / "lra_release" / "pathfinder128" / "curv_contour_length_14") in message
    assert str(tmp_path / "curv_contour_length_14") in message
    assert "lra_release.gz" in message


# ----------------------------------------------------------------------------------------------------
# Batching, schedule, model


def test_warmup_epochs_equal_steps_and_bounds():
    steps_per_epoch = 7
    from_epochs = warmup_steps_from(None, 2.0, steps_per_epoch)
    from_steps = warmup_steps_from(14, None, steps_per_epoch)
    assert from_epochs == from_steps == 14
    total = 100
    schedule_epochs = [lr_factor(step, from_epochs, total) for step in range(total)]
    schedule_steps = [lr_factor(step, from_steps, total) for step in range(total)]
    assert schedule_epochs == schedule_steps

    assert schedule_steps[0] == pytest.approx(1 / 14)
    assert schedule_steps[13] == 1.0
    assert schedule_steps[14] == 1.0
    assert all(0.0 <= factor <= 1.0 for factor in schedule_steps)
    assert all(a < b for a, b in zip(schedule_steps[:14], schedule_steps[1:14]))
    assert all(a >= b for a, b in zip(schedule_steps[14:], schedule_steps[15:]))
    assert schedule_steps[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 85 / 86)))

    no_warmup = [lr_factor(step, 0, 10) for step in range(10)]
    assert no_warmup[0] == 1.0
    assert max(no_warmup) == 1.0

    with pytest.raises(ValueError, match="shorter than the run"):
        lr_factor(0, 100, 100)
    with pytest.raises(ValueError, match="shorter than the run"):
        lr_factor(0, 150, 100)
    with pytest.raises(ValueError, match="not both"):
        warmup_steps_from(3, 1.0, 7)


def test_train_batches_resume_and_ranks():
    full = train_lra.train_batches(50, 8, seed=3, epoch=2, rank=0, world=1)
    assert len(full) == 6, "50 // 8 full batches, the partial one dropped"
    assert train_lra.train_batches(50, 8, seed=3, epoch=2, rank=0, world=1, start=4) == full[4:]
    halves = [train_lra.train_batches(50, 8, seed=3, epoch=2, rank=rank, world=2) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == full
    assert train_lra.train_batches(50, 8, seed=3, epoch=3, rank=0, world=1) != full
    flat = [index for batch in full for index in batch]
    assert len(set(flat)) == len(flat) == 48


def test_bucketed_batches_cover_epoch_and_cut_padding():
    lengths = np.random.default_rng(0).integers(1, 300, size=1000)
    bucketed = train_lra.train_batches(1000, 10, seed=1, epoch=0, rank=0, world=1, lengths=lengths)
    uniform = train_lra.train_batches(1000, 10, seed=1, epoch=0, rank=0, world=1)
    flat = [index for batch in bucketed for index in batch]
    assert sorted(flat) == list(range(1000))

    def padded_tokens(batches):
        return sum(int(lengths[batch].max()) * len(batch) for batch in batches)

    assert padded_tokens(bucketed) < 0.6 * padded_tokens(uniform)
    assert train_lra.train_batches(1000, 10, seed=1, epoch=0, rank=0, world=1, start=37, lengths=lengths) == bucketed[37:]
    halves = [train_lra.train_batches(1000, 10, seed=1, epoch=0, rank=rank, world=2, lengths=lengths) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == bucketed
    assert train_lra.train_batches(1000, 10, seed=1, epoch=1, rank=0, world=1, lengths=lengths) != bucketed


def test_eval_batches_cover_every_example_once():
    split = train_lra.Split([np.zeros(n % 13 + 1) for n in range(23)], np.zeros(23, dtype=np.int64))
    for world in (1, 2, 3):
        indices = [index for rank in range(world)
                   for batch in train_lra.eval_batches(split, 4, rank, world) for index in batch]
        assert sorted(indices) == list(range(23))


class RandomProbe(torch.utils.data.Dataset):
    """Returns, for each index, the worker's next numpy, random and torch draws."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        info = torch.utils.data.get_worker_info()
        return index, (info.id, float(np.random.random()), train_lra.random.random(), float(torch.rand(()))), 0


def probe_stream(seed: int) -> list:
    draws = []
    for epoch in range(2):
        batches = train_lra.train_batches(16, 2, seed, epoch, rank=0, world=1)
        loader = train_lra.make_loader(RandomProbe(), batches, num_workers=4, seed=train_lra.epoch_seed(seed, epoch) + 1)
        for batch in loader:
            draws.extend((epoch,) + tuple(values) for values in batch["tokens"].tolist())
    return draws


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_worker_streams_distinct_and_reproducible(monkeypatch):
    monkeypatch.setattr(train_lra, "collate", lambda items: {"tokens": torch.tensor([item[1] for item in items])})
    first = probe_stream(seed=5)
    assert first == probe_stream(seed=5), "the stream must reproduce from the seed"
    by_stream = {}
    for epoch, worker, numpy_draw, python_draw, torch_draw in first:
        by_stream.setdefault((epoch, int(worker)), []).append((numpy_draw, python_draw, torch_draw))
    assert len(by_stream) == 8, "2 epochs x 4 workers"
    starts = [draws[0] for draws in by_stream.values()]
    for column in range(3):
        values = [start[column] for start in starts]
        assert len(set(values)) == 8, f"two workers or epochs share a random stream (column {column})"
    assert probe_stream(seed=6) != first


def test_padding_does_not_change_logits_with_batch_norm():
    cfg = TrainConfig(dim=16, layers=2, heads=2, norm="batch", dropout=0.0, pos_embedding="learned")
    data = TaskData(None, None, None, vocab_size=16, num_classes=10, max_length=64)
    torch.manual_seed(1)
    model = train_lra.LRAClassifier(cfg, data)
    example = np.arange(1, 12) % 15 + 1

    # Training mode: batch statistics come from real positions only.
    model.train()
    alone = model(*train_lra.pad_sequences([example]))
    tokens = torch.zeros(1, 20, dtype=torch.int64)
    tokens[0, :11] = torch.from_numpy(example.astype(np.int64))
    tokens[0, 11:] = 7  # whatever sits in the padding must not matter
    padded = model(tokens, torch.tensor([11]))
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)

    # Evaluation mode: alone versus inside a padded batch with longer examples.
    model.eval()
    alone = model(*train_lra.pad_sequences([example]))
    batch = model(*train_lra.pad_sequences([np.arange(40) % 15 + 1, example, np.arange(3) + 1]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)


def test_softmax_attention_has_zero_rates_and_no_smoothing():
    cfg = TrainConfig(dim=16, layers=1, heads=4, attention="softmax")
    data = TaskData(None, None, None, vocab_size=16, num_classes=10, max_length=64)
    model = train_lra.LRAClassifier(cfg, data)
    attention = model.encoder.blocks[0].attention
    assert torch.equal(attention.alphas, torch.zeros(4))
    assert attention.pool_size == 1
    las = train_lra.LRAClassifier(TrainConfig(dim=16, layers=1, heads=4, attention="las"), data)
    assert las.encoder.blocks[0].attention.alphas[0] == 0
    assert bool((las.encoder.blocks[0].attention.alphas[1:] > 0).all())
    assert sum(p.numel() for p in las.parameters()) == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# End-to-end runs of the six tasks on tiny files


def check_finished_run(out_dir: Path, test_labels: list[int]) -> dict:
    """Check the outputs every finished run leaves and return its test record."""
    records = read_records(out_dir)
    test = records[-1]
    assert test["event"] == "test", "the test record must be the last line"
    assert [record["event"] for record in records].count("test") == 1
    assert test["test_examples"] == len(test_labels), "every test example is scored"
    majority = Counter(test_labels).most_common(1)[0][1] / len(test_labels)
    assert test["majority_accuracy"] == pytest.approx(majority)
    assert 0.0 <= test["test_accuracy"] <= 1.0
    correct = test["test_accuracy"] * len(test_labels)
    assert correct == pytest.approx(round(correct)), "accuracy must be a count over all test examples"
    evals = [record for record in records if record["event"] == "eval"]
    best = max(evals, key=lambda record: record["val_accuracy"])  # the first maximum
    assert test["best_step"] == best["step"]
    assert Path(json.loads((out_dir / "config.json").read_text())["out_dir"]).resolve() == out_dir.resolve()
    assert (out_dir / "curves.png").stat().st_size > 0
    assert torch.load(out_dir / "best.pt", weights_only=True)["step"] == test["best_step"]
    for name in ("last.pt", "best.pt"):
        assert not (out_dir / (name + ".tmp")).exists()
    return test


def tiny_run(task: str, data_dir: Path, out_dir: Path, capsys, *extra) -> tuple[str, dict]:
    argv = ["--task", task, "--data-dir", data_dir, "--out-dir", out_dir, *TINY_MODEL, "--batch-size", 4,
            "--max-steps", 4, "--warmup-steps", 1, "--eval-every", 2, "--log-every", 1, *extra]
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 0, stderr
    return stdout, read_records(out_dir)


def test_run_listops(tmp_path, capsys):
    write_listops(tmp_path / "lra_release" / "lra_release", sizes=(24, 6, 9))
    out = tmp_path / "run"
    stdout, records = tiny_run("listops", tmp_path, out, capsys, "--attention", "las-chunk", "--chunk-size", 8)
    test_labels = train_lra.read_listops(tmp_path, 2000).test.labels.tolist()
    test = check_finished_run(out, test_labels)
    train = [record for record in records if record["event"] == "train"]
    assert [record["step"] for record in train] == [1, 2, 3, 4]
    peak = json.loads((out / "config.json").read_text())["lr"]
    # Warm-up 1 of 4 steps: the factors are 1, then the cosine 1, 0.75, 0.25.
    assert [record["lr"] for record in train] == pytest.approx([peak, peak, 0.75 * peak, 0.25 * peak])
    assert stdout.strip().splitlines()[-1].startswith("test accuracy")
    assert f"majority-class rate {100 * test['majority_accuracy']:.2f}%" in stdout.strip().splitlines()[-1]

    # A finished run is never overwritten.
    code, _, stderr = run_main(["--task", "listops", "--data-dir", tmp_path, "--out-dir", out], capsys)
    assert_one_line_error(code, stderr, f"{out} already contains a run", f"--resume {out}")


def test_run_text(tmp_path, capsys):
    write_imdb(tmp_path, default_reviews())
    out = tmp_path / "run"
    tiny_run("text", tmp_path / "aclImdb", out, capsys, "--max-length", 64)
    check_finished_run(out, [0] * 5 + [1] * 5)


def test_run_retrieval(tmp_path, capsys):
    write_aan(tmp_path, rows_per_split=(16, 6, 7))
    out = tmp_path / "run"
    tiny_run("retrieval", tmp_path, out, capsys, "--norm", "batch")
    check_finished_run(out, [index % 2 for index in range(7)])


def test_run_image(tmp_path, capsys):
    write_cifar(tmp_path, train_per_batch=4, test_count=7)
    out = tmp_path / "run"
    tiny_run("image", tmp_path / "cifar-10-batches-py", out, capsys)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as file:
        test_labels = pickle.load(file)[b"labels"]
    check_finished_run(out, test_labels)


def test_run_pathfinder(tmp_path, capsys):
    folder = tmp_path / "pathfinder32" / "curv_contour_length_14"
    labels = write_pathfinder(folder, 32, 40, empty=((0, 2),))
    out = tmp_path / "run"
    stdout, _ = tiny_run("pathfinder", tmp_path, out, capsys)
    assert "1 empty or unreadable images skipped" in stdout
    kept = labels[:2] + labels[3:]
    order = torch.randperm(39, generator=torch.Generator().manual_seed(42)).tolist()
    check_finished_run(out, [kept[index] for index in order[-3:]])


def test_run_pathx(tmp_path, capsys):
    folder = tmp_path / "lra_release" / "pathfinder128" / "curv_contour_length_14"
    labels = write_pathfinder(folder, 128, 20)
    out = tmp_path / "run"
    tiny_run("pathx", tmp_path, out, capsys, "--chunk-size", 256, "--batch-size", 2, "--max-steps", 2,
             "--eval-every", 1)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(42)).tolist()
    check_finished_run(out, [labels[index] for index in order[-2:]])


def test_run_default_job_generates_and_reuses(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = dict(train_lra.PRESETS["listops-cpu"], generate_sizes=(40, 8, 10), generate_min_length=10,
                generate_max_length=40, max_length=40, max_steps=4, warmup_steps=1, eval_every=2, log_every=2,
                batch_size=4, dim=16, heads=2, layers=1)
    monkeypatch.setitem(train_lra.PRESETS, "listops-cpu", tiny)
    code, stdout, stderr = run_main(["--out-dir", "first"], capsys)
    assert code == 0, stderr
    folder = tmp_path / "data" / "listops-10-40-40-8-10-seed1234"
    assert (folder / "basic_train.tsv").read_bytes().startswith(b"Source\tTarget\r\n")
    test_labels = train_lra.read_listops(folder, 40).test.labels.tolist()
    first = check_finished_run(tmp_path / "first", test_labels)

    stamp = (folder / "basic_train.tsv").stat().st_mtime_ns
    code, _, stderr = run_main(["--out-dir", "second"], capsys)
    assert code == 0, stderr
    assert (folder / "basic_train.tsv").stat().st_mtime_ns == stamp, "generated files must be reused"
    second = check_finished_run(tmp_path / "second", test_labels)
    assert second["test_accuracy"] == first["test_accuracy"], "same seed, same result"


def test_best_validation_weights_are_tested(tmp_path, capsys, monkeypatch):
    write_listops(tmp_path, sizes=(32, 6, 9))
    real_evaluate = train_lra.evaluate
    scripted = iter([0.3, 0.9, 0.5, 0.2])  # validation peaks at the second evaluation (step 2)
    weights = {}

    def fake_evaluate(model, split, cfg, device):
        fingerprint = [parameter.detach().clone() for parameter in model.parameters()]
        if len(split) == 6:
            accuracy = next(scripted)
            weights[len(weights) + 1] = fingerprint
            return {"loss": 1.0 - accuracy, "accuracy": accuracy, "examples": 6}
        weights["test"] = fingerprint
        return real_evaluate(model, split, cfg, device)

    monkeypatch.setattr(train_lra, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    stdout, records = tiny_run("listops", tmp_path, out, capsys, "--eval-every", 1)
    test = records[-1]
    assert test["best_step"] == 2
    assert test["best_val_accuracy"] == 0.9
    assert all(torch.equal(a, b) for a, b in zip(weights["test"], weights[2])), "test must use step 2 weights"
    assert not all(torch.equal(a, b) for a, b in zip(weights["test"], weights[4]))
    assert "best-validation weights from step 2" in stdout


# ----------------------------------------------------------------------------------------------------
# Resume, signals, torchrun


def run_script(args: list, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_resume_is_bitwise_exact(tmp_path):
    write_listops(tmp_path, sizes=(64, 6, 9))
    common = ["--data-dir", tmp_path, *TINY_MODEL, "--batch-size", 8, "--max-steps", 20, "--warmup-steps", 5,
              "--eval-every", 5, "--log-every", 1, "--dropout", 0.1, "--attention-dropout", 0.1, "--seed", 3]
    straight = run_script([*common, "--out-dir", tmp_path / "straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    first = run_script([*common, "--out-dir", tmp_path / "resumed", "--stop-at-step", 10], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "stopped at step 10" in first.stdout
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["step"] == 10
    second = run_script(["--resume", tmp_path / "resumed"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed at step 10" in second.stdout

    def train_records(name):
        return {record["step"]: record for record in read_records(tmp_path / name) if record["event"] == "train"}

    expected, resumed = train_records("straight"), train_records("resumed")
    assert sorted(expected) == sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        for field in ("loss", "lr", "samples_crc32", "accuracy"):
            assert resumed[step][field] == expected[step][field], f"{field} differs at step {step}"

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 20
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"parameter {name} differs"
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]
    test_a, test_b = read_records(tmp_path / "straight")[-1], read_records(tmp_path / "resumed")[-1]
    assert test_a["test_accuracy"] == test_b["test_accuracy"]
    assert test_a["best_step"] == test_b["best_step"]

    again = run_script(["--resume", tmp_path / "resumed"], tmp_path)
    assert_one_line_error(again.returncode, again.stderr, "already finished at step 20")


def test_sigterm_writes_checkpoint(tmp_path):
    write_listops(tmp_path, sizes=(64, 6, 9))
    out = tmp_path / "run"
    args = ["--data-dir", tmp_path, "--out-dir", out, *TINY_MODEL, "--batch-size", 8, "--max-steps", 100000,
            "--warmup-steps", 1, "--eval-every", 100000, "--log-every", 1]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=tmp_path, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"train"') >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert checkpoint["step"] >= 3
    assert f"stopped at step {checkpoint['step']} by signal SIGTERM" in stdout
    assert read_records(out)[-1] == {"event": "stop", "step": checkpoint["step"], "reason": "signal SIGTERM"}


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_torchrun_two_processes_on_cpu(tmp_path, norm):
    write_listops(tmp_path, sizes=(48, 6, 9))
    # Batch norm takes its statistics over both processes, so one batch of 8 equals two of 4.
    common = ["--data-dir", tmp_path, *TINY_MODEL, "--batch-size", 8, "--max-steps", 4, "--warmup-steps", 1,
              "--eval-every", 2, "--log-every", 1, "--eval-batch-size", 2, "--norm", norm]
    single = run_script([*common, "--out-dir", tmp_path / "single"], tmp_path)
    assert single.returncode == 0, single.stderr

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(SCRIPT),
               *map(str, common), "--out-dir", str(tmp_path / "ddp")]
    ddp = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("test accuracy") == 1, "only process 0 prints"

    records = read_records(tmp_path / "ddp")
    assert [record["event"] for record in records].count("test") == 1, "metrics are written once"
    steps = [record["step"] for record in records if record["event"] == "train"]
    assert steps == [1, 2, 3, 4]
    test_labels = train_lra.read_listops(tmp_path, 2000).test.labels.tolist()
    check_finished_run(tmp_path / "ddp", test_labels)

    # Two halves of each global batch average to the single-process gradient.
    single_losses = [r["loss"] for r in read_records(tmp_path / "single") if r["event"] == "train"]
    ddp_losses = [r["loss"] for r in records if r["event"] == "train"]
    assert ddp_losses == pytest.approx(single_losses, abs=1e-4)


# ----------------------------------------------------------------------------------------------------
# Errors


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2
    assert stderr.endswith("\n"), f"expected one line, got {stderr!r}"
    assert stderr.count("\n") == 1, f"expected one line, got {stderr!r}"
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} missing from {stderr!r}"


def test_error_malformed_row_names_file_and_line(tmp_path, capsys):
    write_listops(tmp_path, sizes=(8, 2, 2))
    path = tmp_path / "listops-1000" / "basic_val.tsv"
    path.write_bytes(path.read_bytes() + b"( [MAX 1 2 ] )\t3\textra\r\n")
    code, _, stderr = run_main(["--data-dir", tmp_path, "--out-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, stderr, f"{path}, line 4", "expected 2 tab-separated fields")


def test_error_label_out_of_range(tmp_path, capsys):
    write_listops(tmp_path, sizes=(8, 2, 2))
    path = tmp_path / "listops-1000" / "basic_test.tsv"
    path.write_bytes(path.read_bytes() + b"( ( [MAX 1 ) ] )\t12\r\n")
    code, _, stderr = run_main(["--data-dir", tmp_path, "--out-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, stderr, f"{path}, line 4", "label '12' is out of range, expected 0..9")

    aan = tmp_path / "aan"
    write_aan(aan)
    bad = aan / "lra_release" / "tsv_data" / "new_aan_pairs.eval.tsv"
    bad.write_bytes(b"2.0\ta\tb\tx\ty\n")
    code, _, stderr = run_main(["--task", "retrieval", "--data-dir", aan, "--out-dir", tmp_path / "run2"], capsys)
    assert_one_line_error(code, stderr, f"{bad}, line 1", "label '2.0' is out of range, expected 0..1")


def test_error_missing_split_file(tmp_path, capsys):
    write_listops(tmp_path, sizes=(8, 2, 2))
    (tmp_path / "listops-1000" / "basic_test.tsv").unlink()
    code, _, stderr = run_main(["--data-dir", tmp_path, "--out-dir", tmp_path / "run"], capsys)
    assert_one_line_error(code, stderr, "no listops data found", str(tmp_path / "listops-1000"),
                          str(tmp_path / "lra_release" / "lra_release" / "listops-1000"), "lra_release.gz")
    assert not (tmp_path / "run").exists(), "no output folder for a run that never started"

    write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3").unlink()
    code, _, stderr = run_main(["--task", "image", "--data-dir", tmp_path / "cifar"], capsys)
    assert_one_line_error(code, stderr, "data_batch_3", "cifar-10-python.tar.gz")


@pytest.mark.parametrize("argv, fragments", [
    (["--task", "sudoku"], ["argument --task: invalid choice: 'sudoku'"]),
    (["--attention", "linear"], ["argument --attention: invalid choice: 'linear'"]),
    (["--layers", "two"], ["argument --layers: invalid int value: 'two'"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    (["--task", "text"], ["--task text needs --data-dir", "aclImdb"]),
    (["--pool-size", "2"], ["--pool-size must be a positive odd integer, got 2"]),
    (["--dim", "30", "--heads", "4"], ["--dim (30) must be divisible by --heads (4)"]),
    (["--resume", "nowhere"], ["no checkpoint nowhere/last.pt to resume from"]),
    (["--max-alpha", "inf"], ["finite --max-alpha >= 0", "got inf"]),
    (["--max-alpha", "nan"], ["finite --max-alpha >= 0", "got nan"]),
    (["--lr", "nan"], ["--lr must be a finite number > 0, got nan"]),
    (["--grad-clip", "0"], ["--grad-clip must be a finite number > 0, got 0.0"]),
    (["--weight-decay", "-1"], ["--weight-decay must be a finite number >= 0, got -1.0"]),
    (["--threads", "0"], ["--threads must be at least 1, got 0"]),
    (["--backend", "flex", "--device", "cpu"], ["--backend flex cannot train on CPU"]),
])
def test_error_bad_options(argv, fragments, capsys):
    code, _, stderr = run_main(argv, capsys)
    assert_one_line_error(code, stderr, *fragments)


def test_error_generator_window_too_small(tmp_path, capsys):
    # Only the ten single digits have length 1, so 22 distinct expressions cannot exist.
    argv = ["generate-listops", "--out", str(tmp_path), "--train-size", "20", "--val-size", "1",
            "--test-size", "1", "--min-length", "0", "--max-length", "2"]
    code, _, stderr = run_main(argv, capsys)
    last_line = stderr.strip().splitlines()[-1]  # the progress bar shares stderr
    assert code == 2
    assert "Traceback" not in stderr
    assert last_line.startswith("train_lra.py: error: generating ListOps stopped")
    assert "after 10 of 22" in last_line


def test_error_warmup_not_shorter_than_run(tmp_path, capsys):
    write_listops(tmp_path, sizes=(8, 2, 2))
    code, _, stderr = run_main(["--data-dir", tmp_path, "--out-dir", tmp_path / "run", *TINY_MODEL,
                                "--batch-size", 4, "--max-steps", 5, "--warmup-epochs", 3], capsys)
    assert_one_line_error(code, stderr, "warm-up (6 steps)", "shorter than the run (5 steps)")


def test_error_from_command_line_has_no_traceback(tmp_path):
    result = run_script(["--task", "sudoku"], tmp_path, timeout=60)
    assert_one_line_error(result.returncode, result.stderr, "invalid choice: 'sudoku'")
