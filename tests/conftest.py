import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

TIERS = ("unit", "integration", "gpu")  # the markers of pytest.ini that .ci/run runs one after another


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {' and '.join(tiers) if tiers else 'no tier marker'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) without exactly one tier marker ({', '.join(TIERS)}; see pytest.ini): give the "
            "file a module-level `pytestmark = pytest.mark.<tier>`, or, where a file mixes tiers, each test "
            "its own mark\n" + "\n".join(wrong))
