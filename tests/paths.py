"""Where tests find the repository and the data shipped for them (tests live in folders mirroring the code)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
