"""Mutants run through bnkit and judged: shared by ``test_mutants.py`` (CI's fixed budget) and
``benchmarks/fuzz_files.py`` (many more, the figures in ``docs/security.md``).

Each mutant (``mutate.py``) is written as ``small.<ext>`` in a folder of its own and read with
``bnkit summary --json`` under small limits (:data:`LIMITS`), so that a legitimately bounded but
large allocation cannot hurt the machine. Its *verdict* is one of

* ``exit 0 correct``: read, and the model is the right one: an inert mutant (``Mutant.inert``)
  gives exactly the source's summary; any other gives the counts of an independent reader
  (``references.py``: Keras' own loader, ``torch.export.load``, ``torch.load``/``safetensors``),
  and no more values than the memory limit can hold (the issue's 2**40-element bias over 4 bytes).
  Where the independent reader refuses a model file, bnkit's summary must be the source's: the
  frameworks also stumble on parts bnkit does not use (a weight's ``device``, a damaged
  bookkeeping member), and a summary that differs then has nothing to be checked against. A
  weights file must be read by the independent reader too (its summary is the factory's);
* ``exit 2 one line``: refused with one clean line;
* ``exit 0 wrong``: read, but as a model the file does not hold (or one its own framework cannot
  load), or the summary is not JSON;
* ``not clean``: a hang, a memory blow-up, a traceback, more than one line... (``_harness.py``).

The last two are failures; each is kept under :data:`FAILURES` with the command, the steps and
what bnkit printed, so the reader's owner can reproduce it with the file alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _harness import Case, Harness, Outcome
from make_corpus import FACTORY, TORCH_INPUT_SHAPE
from mutate import Mutant, mutants

MAX_MODEL_BYTES = 256 * 2**20
LIMITS = ("--max-model-bytes", "256M", "--max-read-seconds", "20")
CASE_SECONDS = 45.0  # bnkit's own deadline (20 s) and its watchdog's grace (10 s), with room
FAILURES = Path(os.environ.get("BNKIT_FUZZ_FAILURES", Path(tempfile.gettempdir()) / "fuzz-failures"))
VERDICTS = ("exit 0 correct", "exit 2 one line", "exit 0 wrong", "not clean")
WEIGHTS = ("pt", "safetensors")
SOURCE_ONLY = "the summary is the source's; the independent reader refused the file"
GENERATION_BYTES = 2**30  # what making a batch of mutants may map (they are at most 32 MiB each)


def command(fmt: str, path: Path) -> tuple[str, ...]:
    """The command line that reads a file of format ``fmt``: a model file, or weights for the factory."""
    if fmt in WEIGHTS:
        shape = ",".join(map(str, TORCH_INPUT_SHAPE))
        return ("summary", "--json", FACTORY, "--weights", str(path), "--input-shape", shape, *LIMITS)
    return ("summary", "--json", str(path), *LIMITS)


def reference(fmt: str, path: Path, sources: dict[str, Path]) -> tuple[str, tuple]:
    if fmt in ("keras", "h5"):
        return ("references:keras_view", (str(path),))
    if fmt == "pt2":
        return ("references:pt2_view", (str(path), str(sources["pt2"])))
    return ("references:weights_view", (str(path),))


def generate(fmt: str, source: bytes, count: int, seed: int) -> list[Mutant]:
    """``count`` mutants of ``source`` (fewer if hypothesis runs out of new ones), the same for the same seed."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed

    found: list[Mutant] = []

    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @with_seed(seed)
    @given(mutants(fmt, source))
    def collect(mutant: Mutant) -> None:
        found.append(mutant)

    with _allocation_limit(GENERATION_BYTES):
        collect()
    return found


@contextlib.contextmanager
def _allocation_limit(extra: int):
    """This process's address space bounded to what it maps now plus ``extra`` bytes, for the block:
    a mutation step that grows without bound raises MemoryError here instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        mapped = int(next(line for line in status if line.startswith("VmSize:")).split()[1]) * 1024
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Verdict:
    mutant: Mutant
    outcome: Outcome
    verdict: str  # one of VERDICTS
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict in ("exit 0 wrong", "not clean")


def judge(mutant: Mutant, outcome: Outcome, original: dict) -> Verdict:
    """The verdict on one mutant (see the module doc); ``original``: the source's summary."""
    if outcome.problems:
        return Verdict(mutant, outcome, "not clean", "; ".join(outcome.problems))
    if outcome.status == 2:
        return Verdict(mutant, outcome, "exit 2 one line")
    try:
        summary = json.loads(outcome.stdout)
    except ValueError:
        return Verdict(mutant, outcome, "exit 0 wrong", "stdout is not the summary's JSON")
    try:
        wrong = _differences(mutant, summary, original, outcome.reference)
    except (KeyError, TypeError) as e:
        wrong = f"the summary's JSON lacks a part ({type(e).__name__}: {e})"
    if wrong:
        return Verdict(mutant, outcome, "exit 0 wrong", wrong)
    reference = outcome.reference
    refused = not isinstance(reference, dict) or "error" in reference
    return Verdict(mutant, outcome, "exit 0 correct", SOURCE_ONLY if refused else "")


def _differences(mutant: Mutant, summary: dict, original: dict, reference) -> str:
    counted = summary["torch"]["params"] + summary["torch"]["buffers"] + summary["torch"]["counters"]
    if counted > MAX_MODEL_BYTES:  # a value takes a byte at least: more were never read within the limit
        return f"{counted} parameters and buffers, more than {MAX_MODEL_BYTES} bytes (--max-model-bytes) can hold"
    if mutant.inert or mutant.fmt in WEIGHTS:  # a factory's counts do not depend on its weights
        if summary != original:
            changed = sorted(k for k in original.keys() | summary.keys() if summary.get(k) != original.get(k))
            return f"read as another model than the source (differs in {', '.join(changed)})"
    if not isinstance(reference, dict) or "error" in reference:
        error = reference.get("error") if isinstance(reference, dict) else reference
        if summary == original and mutant.fmt not in WEIGHTS:  # the framework stumbles on a part bnkit
            return ""  # does not use; a weights file's summary is the factory's, whatever the file holds
        return f"read as another model than the source, and the independent reader does not read it: {error}"
    if mutant.fmt in WEIGHTS:
        return ""
    if mutant.fmt == "pt2":
        torch_counts = summary["torch"]
        seen = {"params": torch_counts["params"], "buffers": torch_counts["buffers"] + torch_counts["counters"]}
    else:
        keras_counts = summary["keras"]
        seen = {k: keras_counts[k] for k in ("total", "trainable", "non_trainable")}
        seen["layers"] = [[row["name"], row["type"]] for row in summary["rows"] if row.get("depth", 0) == 0]
    expected = {k: reference[k] for k in seen}
    if seen != expected:
        return f"bnkit read {_brief(seen)}, the independent reader {_brief(expected)}"
    return ""


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 300 else text[:297] + "..."


def run_mutants(
    harness: Harness,
    fmt: str,
    batch: list[Mutant],
    folder: Path,
    sources: dict[str, Path],
    original: dict,
    label: str,
    progress=None,
) -> list[Verdict]:
    """Write, run and judge each mutant; keep the failures under :data:`FAILURES` (``label`` names them)."""
    verdicts = []
    suffix = sources[fmt].suffix
    for i, mutant in enumerate(batch):
        where = folder / f"{fmt}-{i}"
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"small{suffix}"
        path.write_bytes(mutant.data)
        case = Case(command(fmt, path), name=f"{label}-{fmt}-{i}", reference=reference(fmt, path, sources))
        verdict = judge(mutant, harness.run_one(case), original)
        verdicts.append(verdict)
        if verdict.failed:
            keep(verdict, path)
        shutil.rmtree(where, ignore_errors=True)
        if progress is not None:
            progress(verdict)
    return verdicts


def keep(verdict: Verdict, path: Path) -> Path:
    """Copy a failing mutant to ``FAILURES/<case name>/`` with a README of how to reproduce it."""
    target = FAILURES / verdict.outcome.case.name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target / path.name)
    argv = [str(target / path.name) if a == str(path) else a for a in verdict.outcome.case.argv]
    (target / "README.txt").write_text(
        f"{verdict.verdict}: {verdict.detail}\n\n"
        f"reproduce (from tests/fuzz, KERAS_BACKEND=torch):\n    bnkit {' '.join(argv)}\n\n"
        "made from the valid source by:\n"
        + "".join(f"    {s}\n" for s in verdict.mutant.steps)
        + "\nwhat bnkit did:\n"
        + verdict.outcome.describe()
        + "\n"
    )
    return target


def original_summary(harness: Harness, fmt: str, sources: dict[str, Path]) -> dict:
    """The source's own ``summary --json``: it must be read cleanly, or no mutant can be judged."""
    outcome = harness.run_one(Case(command(fmt, sources[fmt]), name=f"valid-{fmt}"))
    if outcome.status != 0 or outcome.problems:
        raise AssertionError(f"the valid {fmt} source is not read cleanly:\n{outcome.describe()}")
    return json.loads(outcome.stdout)


def table(counts: dict[str, dict[str, int]]) -> str:
    """``counts[fmt][verdict]`` as a text table, with a total row."""
    header = f"{'format':<12}{'mutants':>9}" + "".join(f"{v:>18}" for v in VERDICTS)
    lines = [header, "-" * len(header)]
    total = dict.fromkeys(VERDICTS, 0)
    for fmt, row in counts.items():
        lines.append(f"{fmt:<12}{sum(row.values()):>9}" + "".join(f"{row.get(v, 0):>18}" for v in VERDICTS))
        for v in VERDICTS:
            total[v] += row.get(v, 0)
    lines.append(f"{'all':<12}{sum(total.values()):>9}" + "".join(f"{total[v]:>18}" for v in VERDICTS))
    return "\n".join(lines)
