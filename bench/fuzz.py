"""A long fuzz run: the properties of ``tests/test_fuzz_*.py`` with a large budget of fresh random examples.

CI runs each property on a few hundred fixed examples; this runs them on many more (``--examples`` for the
parsers called directly, ``--server-examples`` for the two that go through a real loopback server, each
example a gRPC call and a liveness check), and prints, per property, the examples tried and the failures.

    OMP_NUM_THREADS=1 python bench/fuzz.py                          # 20,000 / 1,000 examples
    OMP_NUM_THREADS=1 python bench/fuzz.py --examples 2000 -k h5    # one property, briefly
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_fuzz_decoders.py", "tests/test_fuzz_files.py"]
SERVER = "fuzzed"  # the properties that send their examples to a loopback server
# hypothesis --hypothesis-show-statistics: one block per test
_BLOCK = re.compile(r"^(\S+::(test_\w+)):\s*$", re.M)
_COUNTS = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing(?: examples?)?,(?: and)? (\d+) invalid")


def run(selection: str, examples: int) -> tuple[dict[str, tuple[int, int, int]], set[str], float]:
    """{property: (passing, failing, invalid)} of the generate phase, the failed tests, and the seconds taken."""
    env = dict(os.environ, HISTOSURV_FUZZ_EXAMPLES=str(examples))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               "-k", selection, *FILES]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - started
    counts, blocks = {}, _BLOCK.split(out)
    for i in range(1, len(blocks) - 2, 3):
        name, text = blocks[i + 1], blocks[i + 2]
        found = [tuple(map(int, m)) for m in _COUNTS.findall(text)]
        counts[name] = tuple(sum(c[k] for c in found) for k in range(3))
    failed = set(re.findall(r"^FAILED \S+::(test_\w+)", out, re.M))
    if failed:
        print(out[-6000:])
    return counts, failed, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=20_000, help="examples per property called directly")
    p.add_argument("--server-examples", type=int, default=1_000, help="examples per loopback-server property")
    p.add_argument("-k", default="", help="only the properties whose names match (pytest -k)")
    args = p.parse_args(argv)
    only = f" and ({args.k})" if args.k else ""
    results, failed, seconds = {}, set(), {}
    for selection, examples in ((f"not {SERVER}{only}", args.examples), (f"{SERVER}{only}", args.server_examples)):
        counts, bad, took = run(selection, examples)
        results.update(counts)
        failed |= bad
        seconds[selection] = took
    print(f"{'property':<72} {'tried':>7} {'invalid':>8} {'failing':>8}")
    for name, (passing, failing, invalid) in sorted(results.items()):
        print(f"{name:<72} {passing + failing:>7} {invalid:>8} {failing + (name in failed and not failing):>8}")
    total = sum(p + f for p, f, _ in results.values())
    print(f"{len(results)} properties, {total} examples tried, {len(failed)} failed; "
          + ", ".join(f"{s:.0f} s ({'server' if k.startswith(SERVER) else 'direct'})" for k, s in seconds.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
