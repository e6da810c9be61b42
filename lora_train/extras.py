"""Optional packages the extension installs only for a feature the user picked: the WD14 tagger's onnxruntime.

Picking such a feature in the WebUI without its package calls `request_install`, which notes the feature in a
file in the extension's folder; `install.py` reads `requested_packages` at the next WebUI start and installs
them. Nothing here imports the packages or the WebUI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

EXTENSION_DIR = Path(__file__).resolve().parent.parent
REQUESTS_FILE = "requested-extras.txt"  # one feature name a line; .gitignore lists it
# feature: (module to import, pip requirement). onnxruntime 1.23 is the newest with wheels for Python 3.10 (A1111's)
# to 3.13 that runs beside the WebUI's protobuf 3.20.
EXTRAS: Dict[str, Tuple[str, str]] = {
    "tagger": ("onnxruntime", "onnxruntime==1.23.2"),
}


def pip_command(feature: str) -> str:
    return f"pip install {EXTRAS[feature][1]}"


def _requests_path(extension_dir: Optional[Path]) -> Path:
    return Path(extension_dir or EXTENSION_DIR) / REQUESTS_FILE


def request_install(feature: str, extension_dir: Optional[Path] = None) -> None:
    """Notes that the user picked the feature, so that install.py installs its package at the next start."""
    features = read_requests(extension_dir)
    if feature not in features:
        text = "".join(f"{name}\n" for name in [*features, feature])
        _requests_path(extension_dir).write_text(text, encoding="utf-8")


def read_requests(extension_dir: Optional[Path] = None) -> List[str]:
    """The features noted so far (in the extension's folder by default) that this version knows, in order."""
    path = _requests_path(extension_dir)
    lines = path.read_text(encoding="utf-8").split() if path.is_file() else []
    return [name for name in dict.fromkeys(lines) if name in EXTRAS]


def requested_packages(extension_dir: Optional[Path] = None) -> List[Tuple[str, str]]:
    """(module, pip requirement) of every requested feature, for install.py."""
    return [EXTRAS[feature] for feature in read_requests(extension_dir)]
