"""One bench script run in two checkouts, alternating, in one run: a before/after comparison.

Each round runs ``<tree>/.venv/bin/python <tree>/<script> <args>`` once per tree, the order
flipped every round (A B, B A, ...), so a machine that gets busier or quieter slows both alike.
The rows of each run's table (a name, then its first figure) are collected; for every row the
minimum and median over the rounds are printed for both trees, with after/before ratios. No
assertions: this is a measurement.

    python bench/ab_trees.py --before ../wt-before --after . [--rounds 6] \\
        -- bench/engine_overhead.py --calls 5000 --repeats 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
from pathlib import Path

#: A table row: a name, two or more spaces, then its figures (a cost, or a rate such as
#: tasks/s, for which the "min" columns are the worst of the rounds rather than the best).
ROW = re.compile(r"^(\S.*?)\s{2,}(-?\d+(?:\.\d+)?(?:\s+(?:-?\d+(?:\.\d+)?|-))*)\s*$")


def run_once(tree: Path, script: str, args: list[str], column: int = 0) -> dict[str, float]:
    """The rows one run of ``script`` in ``tree`` printed, as name -> its figure ``column``."""
    done = subprocess.run(
        [str(tree / ".venv" / "bin" / "python"), str(tree / script), *args],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    )
    rows: dict[str, float] = {}
    for line in done.stdout.splitlines():
        match = ROW.match(line)
        if match is None:
            continue
        figures = match.group(2).split()
        if len(figures) > column and figures[column] != "-":
            rows[match.group(1).strip()] = float(figures[column])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--column", type=int, default=0, help="which figure of a row (0: the first)"
    )
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    trees = {"before": options.before.resolve(), "after": options.after.resolve()}
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for index in range(options.rounds):
        order = ["before", "after"] if index % 2 == 0 else ["after", "before"]
        for side in order:
            rows = run_once(trees[side], options.script, options.args, options.column)
            for name, value in rows.items():
                samples[side].setdefault(name, []).append(value)
    print(f"{options.script} {' '.join(options.args)}: {options.rounds} rounds, alternating")
    print(f"figure {options.column} of each row (0: the first)")
    print(f"before: {trees['before']}\nafter:  {trees['after']}\n")
    header = f"{'row':<42} {'before min':>10} {'after min':>10} {'ratio':>6}"
    print(f"{header} {'before med':>10} {'after med':>10} {'ratio':>6}")
    for name, before in samples["before"].items():
        after = samples["after"].get(name)
        if not after:
            continue
        cells = [min(before), min(after), statistics.median(before), statistics.median(after)]
        ratios = [_ratio(cells[1], cells[0]), _ratio(cells[3], cells[2])]
        print(
            f"{name:<42} {cells[0]:>10.2f} {cells[1]:>10.2f} {ratios[0]:>6} "
            f"{cells[2]:>10.2f} {cells[3]:>10.2f} {ratios[1]:>6}"
        )


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}" if before > 0.5 else "-"


if __name__ == "__main__":
    main()
