"""Prune N generated networks (tests/generated.py) and count the outcomes.

Every network either prunes exactly (or, with a cross-channel norm on a pruned axis, with verified
shapes) and still trains, or is refused with a clear error; anything counted under BUG is a defect
(the spec is printed so it can become a regression example).

    ./run python benchmarks/fuzz.py [--n 5000] [--seed 0] [--json benchmarks/results/fuzz.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from generated import check, specs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the counts here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    counts: collections.Counter[str] = collections.Counter()
    bugs: list[tuple[str, dict]] = []
    t0 = time.perf_counter()

    @hypothesis_seed(args.seed)
    @settings(max_examples=args.n, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(specs())
    def run(spec: dict) -> None:
        outcome = check(spec)
        counts[outcome] += 1
        if outcome.startswith("BUG"):
            bugs.append((outcome, spec))
        done = sum(counts.values())
        if done % 250 == 0:
            print(f"... {done} networks, {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                  flush=True)

    run()
    total = sum(counts.values())
    print(f"{total} generated networks ({time.perf_counter() - t0:.0f}s, seed {args.seed}):")
    for outcome, n in counts.most_common():
        print(f"  {n:6d}  {n / total:6.1%}  {outcome}")
    for outcome, spec in bugs[:20]:
        print(f"{outcome}\n  spec: {json.dumps(spec)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": total, "seed": args.seed, "counts": dict(counts),
                       "bugs": [{"outcome": o, "spec": s} for o, s in bugs]}, f, indent=1)
    return 1 if bugs else 0


if __name__ == "__main__":
    raise SystemExit(main())
