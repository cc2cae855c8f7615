"""What a wheel ships: every config file, under dsjax/ and no generic top-level name. The wheel
itself is built, installed and used from outside the checkout by .ci/run."""
import ast
import tomllib
from pathlib import Path

from dsjax import config_files

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_is_the_source_tree_and_maps_models_without_links():
    """Every directory with an __init__.py is listed (an unlisted one would be missing from the
    wheel), models/ and configs/ install under dsjax/ by the package mapping, and no symlink
    stands in for them."""
    packages = set(SETUPTOOLS["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("dsjax", "serving")
               for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk | {"dsjax.models", "dsjax.configs", "dsjax.configs.profiles"} == packages
    assert SETUPTOOLS["package-dir"] == {"dsjax.models": "models", "dsjax.configs": "configs"}
    assert not any(p.is_symlink() for top in ("dsjax", "models", "configs", "serving")
                   for p in [ROOT / top, *(ROOT / top).rglob("*")])
    assert config_files.CONFIG_DIR == ROOT / "configs"
    import dsjax.models
    assert Path(dsjax.models.__file__).parent == ROOT / "models"


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
    data = SETUPTOOLS["package-data"]
    shipped = {p.relative_to(ROOT) for package, patterns in data.items()
               if package.startswith("dsjax.configs")
               for pattern in patterns
               for p in (ROOT / "configs" / Path(*package.split(".")[2:])).glob(pattern)
               if p.is_file()}
    on_disk = {p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert on_disk == shipped


def test_profiles_measured_in_a_checkout_go_to_configs():
    assert config_files.profile_output_dir() == ROOT / "configs" / "profiles"
