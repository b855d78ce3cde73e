"""Where the repository's data folders are, found from the package itself (editable install)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO_ROOT / "calibration" / "profiles"
CONF_DIR = REPO_ROOT / "conf"
