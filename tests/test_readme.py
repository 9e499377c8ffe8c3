"""The README's Python examples run as written (issue 10, item 7)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_the_embedded_default_example():
    assert any("default_prior_path()" in block and "loss.backward()" in block for block in python_blocks())


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    """Each block in a fresh namespace, with the data cache in a temporary folder."""
    monkeypatch.setenv("LD3M_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    block = python_blocks()[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    if "DM loss" in block:  # the main example prints one loss per iteration
        losses = [float(x) for x in re.findall(r"DM loss ([0-9.]+)", capsys.readouterr().out)]
        assert len(losses) == 3 and all(loss > 0 for loss in losses)
