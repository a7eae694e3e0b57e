"""Mutants of valid ``.pt2``, ``.keras``, ``.h5``, ``.pt`` and ``.safetensors`` files all end clean.

A fixed number of mutants per format (:data:`MUTANTS_PER_FORMAT`), drawn by hypothesis from a fixed
seed (``mutate.py``: the same mutants on every run), each read with ``bnkit summary --json`` in the
harness's worker and judged by ``fuzzing.judge``: exit 0 with the right model (the source's, or an
independent reader's), or exit 2 with one line, within the time and memory limits. Every failure
is listed at once and kept, with its reproduction, under ``fuzzing.FAILURES``.

``benchmarks/fuzz_files.py`` runs many more, from any seed; its figures are in ``docs/security.md``.
"""

from __future__ import annotations

import collections
import io
import json
import zipfile

import pytest
from _harness import Case, Harness, Outcome
from fuzzing import CASE_SECONDS, FAILURES, generate, judge, original_summary, run_mutants
from make_corpus import valid_sources
from mutate import FORMATS, Mutant

MUTANTS_PER_FORMAT = 120  # 600 mutants: about 25 s on the 2-core CI machine (a core each worker)
SEED = 17


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    sources = valid_sources(folder / "valid")
    with Harness(seconds=CASE_SECONDS) as harness:
        yield harness, sources, folder


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_mutant_ends_clean(fuzz, fmt):
    harness, sources, folder = fuzz
    original = original_summary(harness, fmt, sources)
    batch = generate(fmt, sources[fmt].read_bytes(), MUTANTS_PER_FORMAT, SEED)
    assert len(batch) > MUTANTS_PER_FORMAT * 0.9, "hypothesis ran out of new mutants"
    verdicts = run_mutants(harness, fmt, batch, folder / "mutants", sources, original, f"ci{SEED}")
    failures = [v for v in verdicts if v.failed]
    assert not failures, (
        f"{len(failures)} of {len(verdicts)} {fmt} mutants did not end clean (kept in {FAILURES}):\n"
        + (
            "\n".join(
                f"{v.verdict}: {v.detail}\n{v.outcome.describe()}\n    steps: {'; '.join(v.mutant.steps)}"
                for v in failures
            )
        )
    )
    counts = collections.Counter(v.verdict for v in verdicts)
    assert counts["exit 0 correct"] > 0 and counts["exit 2 one line"] > 0, counts  # both ends are reached


# ------------------------------------------------------------------------------ the mutants themselves


@pytest.fixture(scope="module")
def sources(fuzz):
    return fuzz[1]


def test_a_seed_gives_the_same_mutants(sources):
    source = sources["pt2"].read_bytes()
    first, again = generate("pt2", source, 20, 5), generate("pt2", source, 20, 5)
    assert [(m.data, m.steps) for m in first] == [(m.data, m.steps) for m in again]
    assert len({m.data for m in first}) > 15


@pytest.mark.parametrize("fmt", ["pt2", "keras", "pt", "h5", "safetensors"])
def test_an_inert_mutant_holds_what_its_source_holds(sources, fmt):
    """``inert`` is what allows a summary to be compared with the source's: check it without bnkit."""
    source = sources[fmt].read_bytes()
    inert = [m for m in generate(fmt, source, 60, 3) if m.inert]
    assert inert, "no inert mutant drawn"
    for mutant in inert:
        assert _contents(fmt, mutant.data) == _contents(fmt, source), mutant


def _contents(fmt: str, data: bytes):
    """What a reader takes from the file: members, or datasets and their attributes, or tensors."""
    if fmt in ("pt2", "keras", "pt"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {
                n: _contents("h5", archive.read(n)) if n.endswith(".h5") else archive.read(n)
                for n in archive.namelist()
            }
    if fmt == "safetensors":
        from safetensors.torch import load

        return {k: v.tolist() for k, v in load(data).items()}
    import h5py

    def attributes(obj):
        return sorted((k, str(v)) for k, v in obj.attrs.items() if k != "fuzz_note")  # the inert step's

    found = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(lambda name, obj: found.update({name: (_values(obj), attributes(obj))}))
        found["/"] = attributes(f)
    return found


def _values(obj):
    return obj[()].tolist() if hasattr(obj, "shape") else None


# ------------------------------------------------------------------------------------------ the judge

SUMMARY = {"name": "small", "torch": {"params": 634, "buffers": 8, "counters": 1}, "rows": []}


def _outcome(stdout: dict | str, reference=None, status: int = 0) -> Outcome:
    text = stdout if isinstance(stdout, str) else json.dumps(stdout)
    return Outcome(Case(("summary",)), status, text, "", 0.1, 0, reference=reference)


def test_the_judge_names_a_model_read_wrongly():
    mutant = Mutant("pt2", b"", ("a step",), inert=False)
    right = {"params": 634, "buffers": 9}
    assert judge(mutant, _outcome(SUMMARY, right), SUMMARY).verdict == "exit 0 correct"
    other = {**SUMMARY, "torch": {"params": 600, "buffers": 8, "counters": 1}}
    assert "independent reader" in judge(mutant, _outcome(other, right), SUMMARY).detail
    assert judge(mutant, _outcome(SUMMARY, {"error": "x"}), SUMMARY).verdict == "exit 0 correct"  # as the source
    assert "does not read it" in judge(mutant, _outcome(other, {"error": "x"}), SUMMARY).detail
    huge = {**SUMMARY, "torch": {"params": 2**40, "buffers": 8, "counters": 1}}
    assert "more than" in judge(mutant, _outcome(huge, {"params": 2**40, "buffers": 9}), SUMMARY).detail
    assert judge(mutant, _outcome("not json"), SUMMARY).verdict == "exit 0 wrong"
    weights = Mutant("safetensors", b"", ("a step",), inert=False)
    assert "does not read it" in judge(weights, _outcome(SUMMARY, {"error": "x"}), SUMMARY).detail
    inert = Mutant("pt2", b"", ("a zip comment",), inert=True)
    assert "another model" in judge(inert, _outcome({**SUMMARY, "name": "x"}, right), SUMMARY).detail
