"""The CUDA-only tests (tests/test_cuda.py) on a GPU machine, for benchmarks/gpu.sh.

With pytest installed: ``pytest -q -rs tests/test_cuda.py``. The lent GPU machine has no pytest (see
../shared/device/bundle.sh), so without it each test function is called here directly (the only
fixtures they use are ``checkpoint``, the fixture model, and ``tmp_path``). Either way prints one
line per test and writes ``cuda-checks.json`` to the output folder: per test its name, outcome
(passed, failed or skipped), seconds and error, and under ``measured`` what the tests recorded
(tests/test_cuda.py's ``record``: nvJPEG's differences from Pillow, the device decode's mask
agreement); exits 1 when a test fails.

    python3 benchmarks/cuda_checks.py [OUT_DIR]
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What tests/test_cuda.py records (its record(name, ...) calls), gathered into cuda-checks.json.
MEASURED = ("nvjpeg-vs-pillow", "device-decode-agreement")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "benchmarks" / "out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import pytest
    except ImportError:
        pytest = None
    os.environ["CUDA_CHECKS_OUT"] = str(out)  # where the tests' record() writes its measurements
    if pytest is not None:
        collector = _Collector()
        rc = pytest.main(["-q", "-rs", str(ROOT / "tests" / "test_cuda.py"), f"--junitxml={out / 'cuda-checks.xml'}"],
                         plugins=[collector])
        _write(out, collector.results)
        return int(rc)
    sys.modules["pytest"] = _minimal_pytest()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures"), str(ROOT)]
    from fastsam_batch.offline import configure_ultralytics

    configure_ultralytics()
    module = importlib.import_module("test_cuda")
    results, failed = [], 0
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or fn.__module__ != module.__name__:
            continue
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        fixtures = {"checkpoint": ROOT / "tests" / "fixtures" / "fastsam-fixture.pt", "tmp_path": tmp}
        try:
            fn(**{p: fixtures[p] for p in inspect.signature(fn).parameters})
            outcome, err = "passed", ""
        except Exception:  # noqa: BLE001 - each test's failure reported, the others still run
            outcome, err = "failed", traceback.format_exc()
            failed += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results.append({"test": name, "outcome": outcome, "passed": outcome == "passed",
                        "seconds": round(time.perf_counter() - t0, 2), "error": err})
        print(f"{outcome.upper()} {name} ({results[-1]['seconds']} s)" + (f"\n{err}" if err else ""), flush=True)
        _write(out, results)  # after each test: a later crash keeps the earlier results
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


class _Collector:
    """A pytest plugin: each test's outcome, as the direct branch reports it."""

    def __init__(self):
        self.results = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.results.append({"test": report.nodeid.split("::")[-1], "outcome": report.outcome,
                                 "passed": report.passed, "seconds": round(report.duration, 2),
                                 "error": "" if report.passed or report.skipped else str(report.longrepr)})


def _write(out: Path, results: list) -> None:
    measured = {}
    for p in sorted(out.glob("*.json")):
        if p.name != "cuda-checks.json" and p.stem in MEASURED:
            measured[p.stem] = json.loads(p.read_text())
    (out / "cuda-checks.json").write_text(json.dumps({"tests": results, "measured": measured}, indent=1))


def _minimal_pytest() -> types.ModuleType:
    """What tests/test_cuda.py (and test_decode.py, which it imports) use of pytest, when pytest is not
    installed: ``mark.skipif`` (this runs only where CUDA is), ``mark.parametrize`` and ``skip``."""
    m = types.ModuleType("pytest")

    class Skipped(Exception):
        pass

    def skip(reason=""):
        raise Skipped(reason)

    m.skip = skip
    m.mark = types.SimpleNamespace(skipif=lambda *a, **k: (lambda f: f), parametrize=lambda *a, **k: (lambda f: f))
    return m


if __name__ == "__main__":
    sys.exit(main())
