"""The README's usage examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_example_runs(number, capsys):
    exec(compile(BLOCKS[number], f"README.md python block {number}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "each README example prints what it shows"
