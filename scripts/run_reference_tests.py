#!/usr/bin/env python
"""Runs PyTorch's and Keras' own batch-norm tests twice: as they are, and with bnkit's layers substituted.

    .venv/bin/python scripts/run_reference_tests.py PYTORCH_TEST_FILE... [--keras] [--json OUT]

PYTORCH_TEST_FILE: copies of PyTorch's test files, kept outside this repository (they are not
bnkit's code), e.g. ``test/test_modules.py`` (only its ``BatchNorm`` tests are selected),
``test/nn/test_load_state_dict.py`` or the batch-norm tests of ``test/test_nn.py`` (run whole).
``--keras`` adds Keras' own ``batch_normalization_test.py``, which Keras installs.

For the bnkit run, before collection, ``torch.nn.BatchNorm1d/2d/3d`` become ``bnkit.torch``'s
classes (torch convention), and so do the ``module_cls`` of the BatchNorm entries of PyTorch's
ModuleInfo database; Keras' ``layers.BatchNormalization`` becomes ``bnkit.keras``'s (Keras
convention). Each run is a pytest subprocess; the script prints passed / failed / skipped (and
expected failures) for both, then every test whose outcome differs. It exits 1 when a test
passes with the framework's own layer and not with bnkit's.

``--load-own-pickles`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for both runs, so that
``test_pickle``, which saves a module and loads it back in the same test, checks pickling
instead of failing on ``torch.load``'s ``weights_only`` default (the files are the test's own).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SELECTIONS = {"test_modules.py": "BatchNorm"}  # files not named here run whole
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


# ------------------------------------------------------------------ in the pytest subprocess


_built = collections.Counter()  # bnkit layers built in this process, by class: proof the swap took


def _counting(cls) -> None:
    init = cls.__init__

    def counted_init(self, *args, **kwargs):
        _built[type(self).__name__] += 1
        init(self, *args, **kwargs)

    cls.__init__ = counted_init


def _substitute_bnkit() -> None:
    import torch

    import bnkit.torch as bt
    from bnkit.torch.batchnorm import _ConventionBatchNorm

    _counting(_ConventionBatchNorm)

    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
        original = getattr(torch.nn, name)
        setattr(torch.nn, name, getattr(bt, name))
        try:
            from torch.testing._internal import common_modules
        except ImportError:  # PyTorch's test helpers need expecttest
            continue
        # the same test names ("nn.BatchNorm2d") for both runs, so outcomes pair up test by test
        common_modules.MODULE_CLASS_NAMES[getattr(bt, name)] = common_modules.MODULE_CLASS_NAMES[original]
        for info in common_modules.module_db:
            if info.module_cls is original:
                info.module_cls = getattr(bt, name)
    try:
        import keras
        from keras.src import layers as keras_src_layers

        import bnkit.keras as bk
    except ImportError:
        return
    _counting(bk.BatchNormalization)
    keras.layers.BatchNormalization = bk.BatchNormalization
    keras_src_layers.BatchNormalization = bk.BatchNormalization


class _Recorder:
    """Substitutes the layers (bnkit runs) and records each test's outcome as JSON lines."""

    def __init__(self, substitute: bool, report: str):
        self.substitute = substitute
        self.report = open(report, "w")  # noqa: SIM115 (closed at session end)

    def pytest_configure(self, config):
        if self.substitute:
            _substitute_bnkit()

    def pytest_runtest_logreport(self, report):
        outcome = None
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed" if report.passed else None
        elif report.when == "call":
            outcome = report.outcome
        elif report.failed:
            outcome = "error"
        elif report.skipped:
            outcome = "skipped"
        if outcome is not None:
            self.report.write(json.dumps({"test": report.nodeid, "outcome": outcome}) + "\n")

    def pytest_sessionfinish(self, session):
        self.report.write(json.dumps({"built": dict(_built)}) + "\n")
        self.report.close()


def _worker(substitute: bool, report: str, pytest_args: list[str]) -> int:
    import pytest

    return pytest.main(pytest_args, plugins=[_Recorder(substitute, report)])


# ------------------------------------------------------------------ the driver


def _run(path: Path, substitute: bool, env: dict) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "outcomes.jsonl"
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        args = [str(path), "-q", "-p", "no:cacheprovider", "-c", str(ini), f"--rootdir={path.parent}"]
        if path.name in SELECTIONS:
            args += ["-k", SELECTIONS[path.name]]
        command = [sys.executable, __file__, "--worker", "bnkit" if substitute else "framework", str(report), "--"]
        completed = subprocess.run(command + args, cwd=path.parent, env=env, capture_output=True, text=True)
        outcomes, built = {}, {}
        if report.exists():
            for line in report.read_text().splitlines():
                row = json.loads(line)
                if "built" in row:
                    built = row["built"]
                    continue
                # a test's last word wins (a failing teardown after a passing call is an error)
                if row["outcome"] != "error" or row["test"] not in outcomes:
                    outcomes[row["test"]] = row["outcome"]
                else:
                    outcomes[row["test"]] = "error"
        if not outcomes:
            sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
            raise SystemExit(f"{path}: pytest collected nothing (exit {completed.returncode})")
        if substitute and not built:
            raise SystemExit(f"{path}: no bnkit layer was built: the substitution did not take")
        return outcomes, built


def _counts(outcomes: dict[str, str]) -> dict[str, int]:
    counted = collections.Counter(outcomes.values())
    return {name: counted.get(name, 0) for name in OUTCOMES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="copies of PyTorch's test files")
    parser.add_argument("--keras", action="store_true", help="also Keras' installed batch_normalization_test.py")
    parser.add_argument("--load-own-pickles", action="store_true",
                        help="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, for test_pickle (see the module docstring)")
    parser.add_argument("--json", type=Path, help="write the counts and every differing test here")
    args = parser.parse_args(argv)
    files = [f.resolve() for f in args.files]
    for f in files:
        if not f.is_file():
            parser.error(f"{f}: no such file")
    if args.keras:
        import importlib.util

        spec = importlib.util.find_spec("keras")
        files.append(Path(spec.origin).parent / "src/layers/normalization/batch_normalization_test.py")
    if not files:
        parser.error("give PyTorch test files, --keras, or both")

    env = dict(os.environ, KERAS_BACKEND="torch")
    if args.load_own_pickles:
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    summary, worse = [], 0
    print(f"{'file':<34} {'layers':<10} " + " ".join(f"{o:>8}" for o in OUTCOMES))
    for path in files:
        (theirs, _), (ours, built) = _run(path, False, env), _run(path, True, env)
        differing = {t: (theirs.get(t), ours.get(t)) for t in sorted(set(theirs) | set(ours))
                     if theirs.get(t) != ours.get(t)}
        regressions = [t for t, (a, b) in differing.items() if a == "passed" and b != "passed"]
        worse += len(regressions)
        for label, outcomes in (("framework", theirs), ("bnkit", ours)):
            counts = _counts(outcomes)
            print(f"{path.name:<34} {label:<10} " + " ".join(f"{counts[o]:>8}" for o in OUTCOMES))
        print(f"    bnkit layers built in the bnkit run: {', '.join(f'{n} {k}' for k, n in sorted(built.items()))}")
        for test, (a, b) in differing.items():
            print(f"    {test.split('::', 1)[-1]}: {a} with the framework's layer, {b} with bnkit's")
        summary.append({"file": path.name, "framework": _counts(theirs), "bnkit": _counts(ours), "built": built,
                        "differing": {t: {"framework": a, "bnkit": b} for t, (a, b) in differing.items()}})
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{worse} test(s) pass with the framework's layer and not with bnkit's")
    return 1 if worse else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        substitute, report = sys.argv[2] == "bnkit", sys.argv[3]
        raise SystemExit(_worker(substitute, report, sys.argv[5:]))
    raise SystemExit(main())
