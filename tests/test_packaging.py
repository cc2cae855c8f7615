"""What a wheel ships: every config file, under dsjax/ and no generic top-level name. The wheel
itself is built, installed and used from outside the checkout by .ci/run."""
import ast
import tomllib
from pathlib import Path

from dsjax import config_files

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_source_tree_imports_the_names_a_wheel_installs():
    assert (ROOT / "dsjax" / "models").readlink() == Path("../models")
    assert (ROOT / "dsjax" / "configs").readlink() == Path("../configs")
    assert config_files.CONFIG_DIR == ROOT / "configs"
    assert not any(p.startswith("models") for p in SETUPTOOLS["packages"]["find"]["include"])


def test_nothing_imports_the_top_level_models():
    # `import models` works in a checkout (its root is on sys.path) but not from a wheel.
    offenders = []
    for folder in ("dsjax", "models", "serving", "tests", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                         else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names
                              if n.split(".")[0] == "models"]
    assert not offenders


def test_package_data_covers_every_config_file():
    package = ROOT / "dsjax"
    shipped = {p.relative_to(package) for pattern in SETUPTOOLS["package-data"]["dsjax"]
               for p in package.glob(pattern) if p.is_file()}
    config_files_on_disk = {p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert config_files_on_disk <= shipped


def test_profiles_measured_in_a_checkout_go_to_configs():
    assert config_files.profile_output_dir() == ROOT / "configs" / "profiles"
