"""Make the top-level modules (model, attention, ...) and the test helpers importable from any directory."""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for path in (TESTS.parent, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
