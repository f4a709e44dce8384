"""Start-up cost of the CLI: ``python -m robustft fit --help`` as a multiple of ``import lightning.pytorch``.

Why: every command (``fit``, ``evaluate``, ``--help``) pays the import of robustft before doing anything.
Lightning itself is the floor (the CLI is a LightningCLI); anything above it is robustft importing
packages the command does not use (open_clip, timm, webdataset, tensorboard). The issue's goal is
<= 1.3x. Both commands run as fresh subprocesses, alternating, best of ``--repeats`` each (the least
noisy estimate on a shared machine). Also prints which optional heavy packages ``fit --help`` imported:

    python tools/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: packages only some methods / sources need: none of them should load for ``fit --help``
OPTIONAL_HEAVY = ("open_clip", "timm", "webdataset", "tensorboard", "tensorboardX", "sklearn", "matplotlib")

FLOOR = [sys.executable, "-c", "import lightning.pytorch"]
CLI = [sys.executable, "-m", "robustft", "fit", "--help"]
PROBE = (
    "import sys, contextlib, io\n"
    "from robustft.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n"
    "        main(['fit', '--help'])\n"
    "    except SystemExit:\n"
    "        pass\n"
    f"print(','.join(m for m in {OPTIONAL_HEAVY!r} if m in sys.modules))\n"
)


def wall(command: list[str], cwd: Path = REPO) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``command``.

    CPU time is what the command itself costs; wall time adds whatever the other jobs of a shared
    machine take from it, so on a loaded machine the CPU-time ratio is the steadier of the two."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cwd", type=Path, default=REPO, help="folder to run in (its robustft/ is imported)")
    args = parser.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS", "unset")
    wall(FLOOR, args.cwd)  # warm the file cache for both
    wall(CLI, args.cwd)
    floor, cli = (float("inf"), float("inf")), (float("inf"), float("inf"))
    for _ in range(args.repeats):
        floor = tuple(map(min, floor, wall(FLOOR, args.cwd)))
        cli = tuple(map(min, cli, wall(CLI, args.cwd)))
    loaded = subprocess.run([sys.executable, "-c", PROBE], cwd=args.cwd, check=True, capture_output=True, text=True)
    heavy = set(loaded.stdout.strip().splitlines()[-1].split(",")) - {""} if loaded.stdout.strip() else set()
    floor_probe = f"import sys, lightning.pytorch; print(','.join(m for m in {OPTIONAL_HEAVY!r} if m in sys.modules))"
    by_lightning = subprocess.run([sys.executable, "-c", floor_probe], cwd=args.cwd, check=True, capture_output=True,
                                  text=True).stdout.strip().split(",")
    print(f"python {sys.version.split()[0]}, OMP_NUM_THREADS={env_threads}, best of {args.repeats}")
    print(f"python -c 'import lightning.pytorch': {floor[0]:6.2f} s wall, {floor[1]:6.2f} s CPU")
    print(f"python -m robustft fit --help:       {cli[0]:6.2f} s wall, {cli[1]:6.2f} s CPU")
    print(f"optional packages imported by fit --help: {', '.join(sorted(heavy)) or 'none'}; of these, "
          f"robustft's own (not already imported by lightning.pytorch): "
          f"{', '.join(sorted(heavy - set(by_lightning))) or 'none'}")
    print(f"start-up ratio: {cli[0] / floor[0]:.2f}x wall, {cli[1] / floor[1]:.2f}x CPU (goal <= 1.3x)")


if __name__ == "__main__":
    main()
