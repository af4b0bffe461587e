"""The CUDA-only tests (tests/test_cuda.py) on a GPU machine, for benchmarks/gpu.sh.

With pytest installed: ``pytest -q -rs tests/test_cuda.py``. The lent GPU machine has no pytest (see
../shared/device/bundle.sh), so without it each test function is called here directly (the only
fixture they use, ``checkpoint``, is the fixture model). Prints one line per test and writes
``cuda-checks.json`` (name, passed, error) to the output folder; exits 1 when a test fails.

    python3 benchmarks/cuda_checks.py [OUT_DIR]
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "benchmarks" / "out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import pytest
    except ImportError:
        pytest = None
    if pytest is not None:
        rc = pytest.main(["-q", "-rs", str(ROOT / "tests" / "test_cuda.py"), f"--junitxml={out / 'cuda-checks.xml'}"])
        return int(rc)
    sys.modules["pytest"] = _minimal_pytest()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures"), str(ROOT)]
    from fastsam_batch.offline import configure_ultralytics

    configure_ultralytics()
    module = importlib.import_module("test_cuda")
    fixtures = {"checkpoint": ROOT / "tests" / "fixtures" / "fastsam-fixture.pt"}
    results, failed = [], 0
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or fn.__module__ != module.__name__:
            continue
        t0 = time.perf_counter()
        try:
            fn(**{p: fixtures[p] for p in inspect.signature(fn).parameters})
            ok, err = True, ""
        except Exception:  # noqa: BLE001 - each test's failure reported, the others still run
            ok, err = False, traceback.format_exc()
            failed += 1
        results.append({"test": name, "passed": ok, "seconds": round(time.perf_counter() - t0, 2), "error": err})
        print(f"{'PASS' if ok else 'FAIL'} {name} ({results[-1]['seconds']} s)" + (f"\n{err}" if err else ""), flush=True)
    (out / "cuda-checks.json").write_text(json.dumps(results, indent=1))
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


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
