"""Where the shipped config tables (configs/: model sizes, SLOs, profiles, placements) are
found, and where the profiler saves the profiles a user measures.

A wheel installs configs/ as package data at dsjax/configs; a source checkout (and an editable
install, which runs from it) finds it at the repository's top level, beside dsjax/.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).parent / "configs"
_CHECKOUT = Path(__file__).resolve().parent.parent / "configs"
IN_CHECKOUT = not _PACKAGED.is_dir()
CONFIG_DIR = (_CHECKOUT if IN_CHECKOUT else _PACKAGED).resolve()
PROFILE_DIR = CONFIG_DIR / "profiles"


def profile_output_dir() -> Path:
    """Default directory for a new profile: configs/profiles in a source checkout, where measured
    profiles are committed; the current directory when dsjax is installed, since the installed
    copy is pip's to replace or remove (pass the file to --profile to use it)."""
    return PROFILE_DIR if IN_CHECKOUT else Path.cwd()
