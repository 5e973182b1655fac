"""How long ``edgefleet --help`` takes, as a ratio against ``python -c pass`` in the same run.

An operator types ``edgefleet ...`` many times a day, and scripts call it in
loops; every command pays the interpreter's start plus our imports. The
root group imports no command module for ``--help`` (issue 10), so its cost
should be the interpreter, click and the root module. The machine's speed and
load cancel out of the ratio; the absolute medians are printed too.

    python bench/cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": ["-c", "pass"],
    "import click": ["-c", "import click"],
    "edgefleet --help": [
        "-c",
        "import sys; from edgefleet.controller.cli import main; "
        "sys.argv = ['edgefleet', '--help']; main()",
    ],
    "edgefleet deploy --help": [
        "-c",
        "import sys; from edgefleet.controller.cli import main; "
        "sys.argv = ['edgefleet', 'deploy', '--help']; main()",
    ],
}


def _once(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    for args in CASES.values():  # warm the file cache and .pyc files
        _once(args)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(runs):  # interleaved, so load changes hit every case alike
        for name, args in CASES.items():
            samples[name].append(_once(args))
    base = statistics.median(samples["python -c pass"])
    print(f"{'case':<26} {'median s':>9} {'x python -c pass':>17}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<26} {median:>9.3f} {median / base:>17.2f}")


if __name__ == "__main__":
    main()
