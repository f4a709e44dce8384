"""Run tests/test_bad_input.py and write the table "case -> message" to experiments/reliability/.

    .venv/bin/python tools/bad_input_table.py

Every row is a case the test suite drives through the real CLI (exit code 2, no traceback, the named
field or file asserted by the test); the message column is what the user saw, with the temporary
folders of the test shortened to ``<tmp>``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "reliability" / "bad_input_table.md"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "cases.jsonl"
        env = {**os.environ, "ROBUSTFT_BAD_INPUT_TABLE": str(table), "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                                 "tests/test_bad_input.py"], cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
        rows = [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []
    lines = [
        "# Bad input through the real CLI: case -> message",
        "",
        "Command: `.venv/bin/python tools/bad_input_table.py` (runs `pytest tests/test_bad_input.py`).",
        f"Result: {summary}; {seconds:.0f} s wall on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"Python {platform.python_version()}.",
        "Every case exits with code 2, prints no traceback, and leaves the earlier run's files unchanged "
        "(asserted by the test). `<tmp>` stands for the test's temporary folder.",
        "",
        "| case | message |",
        "| --- | --- |",
    ]
    for row in rows:
        message = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/]+\d*", "<tmp>", row["message"])
        message = message.replace(str(REPO) + "/", "").replace("|", "\\|").replace("\n", "<br>")
        lines.append(f"| `{row['case']}` | {message} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} cases -> {OUT}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
