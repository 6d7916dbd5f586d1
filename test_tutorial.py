"""Check tutorial.ipynb: its committed form reads on GitHub, and it runs from a fresh kernel on CPU.

The execution test copies the notebook, las.py and train_lra.py into a temporary folder and runs every
cell there with nbclient (kernel "python3"), so a stale cell or a file written outside the notebook's
own scratch folder fails the suite. It takes about a minute on 2 CPU cores.
"""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent
NOTEBOOK = REPO / "tutorial.ipynb"
MODULES = ("las.py", "train_lra.py")

# The section headings, in order: "## <number>. <title starting with these words>".
SECTIONS = [
    (1, "Why plain attention underperforms"),
    (2, "The decay"),
    (3, "Smoothing"),
    (4, "The lens of long convolutions"),
    (5, "The smoothing identity"),
    (6, "Causal mode"),
    (7, "Padding"),
    (8, "LaS-chunk"),
    (9, "Training"),
    (10, "Using LaS in your own model"),
]
MIN_IMAGES = 6
MAX_COMMITTED_BYTES = 1_500_000
CELL_TIMEOUT_S = 300


def section_numbers(notebook) -> list[int]:
    """Return the numbers of the "## N. Title" headings in the notebook's markdown cells, in order."""
    numbers = []
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for number, title in SECTIONS:
            if re.search(rf"^## {number}\. {re.escape(title)}", cell.source, flags=re.MULTILINE):
                numbers.append(number)
    return numbers


def outputs_of(notebook, output_type: str) -> list:
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == output_type
    ]


def image_count(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def files_under(folder: Path) -> set[str]:
    return {
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and ".ipynb_checkpoints" not in path.parts
    }


@pytest.fixture(scope="module")
def committed():
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run a copy of the notebook with cleared outputs in a folder that contains only what it needs."""
    folder = tmp_path_factory.mktemp("tutorial")
    for name in MODULES:
        shutil.copy(REPO / name, folder / name)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    files_before = files_under(folder)

    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()
    return notebook, files_before, files_under(folder)


def test_sections_in_order(committed):
    assert section_numbers(committed) == [number for number, _ in SECTIONS]


def test_committed_notebook_has_outputs(committed):
    code_cells = [cell for cell in committed.cells if cell.cell_type == "code"]
    unexecuted = [index for index, cell in enumerate(code_cells) if cell.execution_count is None]
    assert not unexecuted, f"code cells {unexecuted} have no outputs; re-execute the notebook before committing"
    assert image_count(committed) >= MIN_IMAGES
    assert not outputs_of(committed, "error")


def test_committed_notebook_size():
    size = NOTEBOOK.stat().st_size
    assert size < MAX_COMMITTED_BYTES, f"tutorial.ipynb is {size:,} bytes; lower the figure dpi or sizes"


def test_committed_notebook_runs_in_order(committed):
    # Counts 1, 2, 3, ... show that the outputs come from one top-to-bottom run of a fresh kernel.
    counts = [cell.execution_count for cell in committed.cells if cell.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))


def test_notebook_executes_without_errors(executed):
    notebook, _, _ = executed
    errors = outputs_of(notebook, "error")
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"


def test_notebook_draws_pictures(executed):
    notebook, _, _ = executed
    assert image_count(notebook) >= MIN_IMAGES


def test_notebook_prints_no_warnings(executed):
    notebook, _, _ = executed
    stderr = [output.text for output in outputs_of(notebook, "stream") if output.name == "stderr"]
    assert not stderr, stderr[0]


def test_notebook_writes_only_to_its_scratch_folder(executed):
    _, files_before, files_after = executed
    assert files_after == files_before, f"new files: {sorted(files_after - files_before)}"
