"""Fixtures of the deploy tests (pytest finds them here); the code is in
deploylab.py, which the tests import (never `conftest`: see tests/support.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from deploylab import (deployed, lab, pytest_runtest_makereport,  # noqa: E402,F401
                       pytest_terminal_summary)
