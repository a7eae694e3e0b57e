"""Many more mutants of valid model files than CI runs, and the outcome of each: the fuzz figures.

    KERAS_BACKEND=torch python benchmarks/fuzz_files.py [--mutants 1000] [--seed N] [--formats pt2,keras,h5]

The mutants are tests/fuzz/mutate.py's (hypothesis, from ``--seed``: the same seed gives the same
mutants of the same source files; without it a random seed, printed), each read with
``bnkit summary --json`` under small limits through tests/fuzz/_harness.py's worker and judged by
tests/fuzz/fuzzing.py: "exit 0 correct", "exit 2 one line", or a failure ("exit 0 wrong",
"not clean"), kept with its reproduction under /tmp/fuzz-failures/ (or $BNKIT_FUZZ_FAILURES).
Printed: one table of counts per format and verdict, every failure, the times, and the slowest
mutants (a refusal that takes seconds is a near-hang worth a look).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the bnkit command sets it
FUZZ = Path(__file__).resolve().parents[1] / "tests" / "fuzz"
sys.path.insert(0, str(FUZZ))

from _harness import Harness  # noqa: E402
from fuzzing import (  # noqa: E402
    CASE_SECONDS,
    FAILURES,
    SOURCE_ONLY,
    generate,
    original_summary,
    run_mutants,
    table,
)
from make_corpus import valid_sources  # noqa: E402
from mutate import FORMATS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--mutants", type=int, default=1000, help="mutants per format (default 1000)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a random one, printed)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--sources", type=Path, help="a folder for the valid files (kept, reused: same bytes)")
    args = parser.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    formats = [f for f in args.formats.split(",") if f]
    print(f"seed {seed}, {args.mutants} mutants per format, formats {', '.join(formats)}", flush=True)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bnkit-fuzz-") as tmp:
        sources = valid_sources(args.sources or Path(tmp) / "valid")
        counts: dict[str, collections.Counter] = {}
        failures = []
        source_only = collections.Counter()
        everything = []
        times = {}
        with Harness(seconds=CASE_SECONDS) as harness:
            for fmt in formats:
                t0 = time.monotonic()
                batch = generate(fmt, sources[fmt].read_bytes(), args.mutants, seed)
                t1 = time.monotonic()
                original = original_summary(harness, fmt, sources)
                verdicts = run_mutants(
                    harness, fmt, batch, Path(tmp) / "mutants", sources, original, f"seed{seed}",
                    progress=_progress(fmt, len(batch)),
                )  # fmt: skip
                t2 = time.monotonic()
                counts[fmt] = collections.Counter(v.verdict for v in verdicts)
                failures += [v for v in verdicts if v.failed]
                everything += verdicts
                source_only[fmt] = sum(v.detail == SOURCE_ONLY for v in verdicts)
                times[fmt] = (t1 - t0, t2 - t1)
                print(f"\r{fmt}: {len(batch)} mutants, made in {t1 - t0:.1f} s, run in {t2 - t1:.1f} s" + " " * 20)
            workers = harness.workers_started
    print()
    print(table(counts))
    if sum(source_only.values()):
        shown = ", ".join(f"{fmt} {n}" for fmt, n in source_only.items() if n)
        print(f"exit 0 correct by the source's summary alone (the independent reader refused the file): {shown}")
    print()
    for fmt, (made, ran) in times.items():
        n = sum(counts[fmt].values())
        print(f"{fmt:<12} made {made:6.1f} s, run {ran:6.1f} s ({1000 * ran / max(n, 1):.0f} ms a mutant)")
    print(f"total {time.monotonic() - started:.1f} s, {workers} worker process(es) started")
    print("\nslowest mutants (bnkit's time, peak RSS growth):")
    for verdict in sorted(everything, key=lambda v: -v.outcome.seconds)[:5]:
        outcome = verdict.outcome
        print(
            f"  {outcome.seconds:6.2f} s {outcome.rss_growth / 2**20:6.0f} MiB  {outcome.case.name}: {verdict.verdict}"
        )
        print(f"      steps: {'; '.join(verdict.mutant.steps)}")
    most = max(everything, key=lambda v: v.outcome.rss_growth, default=None)
    if most is not None:
        print(f"largest peak RSS growth: {most.outcome.rss_growth / 2**20:.0f} MiB ({most.outcome.case.name})")
    if failures:
        print(f"\n{len(failures)} failure(s), kept under {FAILURES}/:")
        for verdict in failures:
            print(f"- {verdict.outcome.case.name}: {verdict.verdict}: {verdict.detail}")
            print(f"    steps: {'; '.join(verdict.mutant.steps)}")
    return 1 if failures else 0


def _progress(fmt: str, total: int):
    done = collections.Counter()

    def show(verdict) -> None:
        done[verdict.verdict] += 1
        n = sum(done.values())
        if n % 10 == 0 or n == total:
            print(f"\r{fmt}: {n}/{total} " + ", ".join(f"{k} {v}" for k, v in sorted(done.items())), end="",
                  flush=True)  # fmt: skip

    return show


if __name__ == "__main__":
    sys.exit(main())
