"""The README's Python examples run as written; the configs it points to load."""
import re
from pathlib import Path

import pytest

from dsjax.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_examples():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_example_runs(index, capsys):
    exec(compile(PYTHON_BLOCKS[index], f"README block {index}", "exec"), {})
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("opt*b*.toml")))
def test_shipped_placement_configs_load(path):
    config = EngineConfig.from_file(path)
    assert config.model.startswith("opt-")


def test_readme_starts_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert first_block == ['pip install -e . && python -m serving',
                           'pip install -e ".[test]" && python -m pytest -q']
