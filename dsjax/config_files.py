"""Where the shipped config tables (configs/: OPT sizes, SLOs, profiles, placements) are found,
and where the profiler saves the profiles a user measures.

dsjax/configs is a symlink to the repo's configs/ in a source checkout and a copy of it (package
data) in a wheel, so the one path below serves a checkout, an editable install and a wheel.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).parent / "configs"
CONFIG_DIR = _PACKAGED.resolve()
PROFILE_DIR = CONFIG_DIR / "profiles"


def profile_output_dir() -> Path:
    """Default directory for a new profile: configs/profiles in a source checkout, where measured
    profiles are committed; the current directory when dsjax is installed, since the installed
    copy is pip's to replace or remove (pass the file to --profile to use it)."""
    return PROFILE_DIR if _PACKAGED.is_symlink() else Path.cwd()
