"""CI's skip gate: a test may skip only because this machine has no CUDA GPU.

    python .ci/skips.py PYTEST_OUTPUT     exit 1, listing them, if any other skip is reported

Reads the `SKIPPED [n] file:line: reason` lines that `pytest -rs` prints. A skip for a missing package
or a kernel that did not compile would otherwise turn a broken install into a green run; every GPU
skip's reason names "CUDA GPU" (tests/gpu, and the CPU-only variants of a few tests)."""

import re
import sys

SKIP = re.compile(r"^SKIPPED \[\d+\] (.*)$")


def unexpected_skips(output: str) -> list:
    return [m.group(1) for line in output.splitlines() if (m := SKIP.match(line.strip()))
            and "CUDA GPU" not in m.group(1)]


if __name__ == "__main__":
    with open(sys.argv[1], errors="replace") as f:
        bad = unexpected_skips(f.read())
    for reason in bad:
        print(f"skipped for another reason than a missing CUDA GPU: {reason}", file=sys.stderr)
    sys.exit(1 if bad else 0)
