"""Run the Python example of README.md, so the documented usage cannot go stale."""

import re
from pathlib import Path

import torch

README = Path(__file__).with_name("README.md")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_one_python_example():
    assert len(python_blocks()) == 1


def test_readme_example_runs_as_documented(capsys):
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)

    printed = capsys.readouterr().out.splitlines()
    assert printed == ["torch.Size([2, 4, 128, 16])", "torch.Size([2, 128, 64])"]
    torch.testing.assert_close(namespace["alphas"], torch.tensor([0.0, 0.001, 0.01, 0.1]))
    padding = namespace["padding"]
    assert torch.isfinite(namespace["y"]).all()
    assert namespace["y"][~padding].abs().sum() > 0


def test_readme_comments_match_results():
    # Each "# torch.Size(...)" comment in the example must equal what the line before it prints.
    code = python_blocks()[0]
    documented = re.findall(r"print\((\w+)\.shape\)\s+# (torch\.Size\(\[[\d, ]+\]\))", code)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert len(documented) == 2
    for name, text in documented:
        assert str(namespace[name].shape) == text, name
