"""Command line: ``fastsam-batch run MANIFEST.yaml [--overwrite] [--retry-errors [REASONS]] [--break-lease] [--debug]``.

Exit status: 0 the run finished (error rows included); 1 the run failed (a preflight check, error
budget exceeded, rows missing, or a job-level error: one ``fastsam-batch:`` line says which);
2 the manifest or the command line is invalid; 130 interrupted (Ctrl-C: what was done is
committed, the same command resumes).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastsam-batch", description="Segment image collections with FastSAM on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job manifest")
    run.add_argument("manifest", help="job manifest (YAML)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the rows already in output.uri (the old files are removed once the checks have "
                          "passed and Ray is up, just before the new rows are written)")
    run.add_argument("--retry-errors", nargs="?", const="all", metavar="REASONS",
                     help="process again the images whose rows are errors: all of them, or only those of the given "
                          "reasons (comma-separated, e.g. read_failed,segment_failed); their old rows are replaced")
    run.add_argument("--break-lease", action="store_true",
                     help="take over output.uri's lease from a run that is gone (see README: one writer per output)")
    run.add_argument("--debug", action="store_true", help="show tracebacks and Ray's own log lines")
    args = ap.parse_args(argv)

    from .manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as e:
        print(f"fastsam-batch: {e}", file=sys.stderr)
        return 2
    retry = None
    if args.retry_errors is not None:
        from .schema import ERROR_REASONS

        retry = frozenset(r.strip() for r in args.retry_errors.split(",") if r.strip())
        unknown = sorted(retry - set(ERROR_REASONS) - {"all"})
        if not retry or unknown:
            print(f"fastsam-batch: --retry-errors: unknown error reason {', '.join(unknown) or '(none)'}; give some of "
                  f"{', '.join(ERROR_REASONS)} (comma-separated), or nothing for all", file=sys.stderr)
            return 2

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .console import StderrFilter, quiet_ray_loggers

    noise = None
    if not args.debug:
        quiet_ray_loggers()
        noise = StderrFilter()
    try:
        return _run(manifest, args, retry)
    finally:
        if noise is not None:
            noise.close()


def _run(manifest, args, retry) -> int:
    from .job import JobError, run_job
    from .model import CheckpointError
    from .preflight import PreflightError
    from .storage import storage_error_cause

    def say(msg: str) -> None:
        print(f"fastsam-batch: {msg}", file=sys.stderr, flush=True)

    try:
        summary = run_job(manifest, overwrite=args.overwrite, log=lambda msg: print(msg, flush=True),
                          break_lease=args.break_lease, retry_errors=retry, debug=args.debug)
    except (JobError, CheckpointError, PreflightError) as e:
        if args.debug:
            raise
        say(str(e))
        return 1
    except KeyboardInterrupt:
        say("interrupted: stopped at once; the files committed so far are kept, run the same command to resume")
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback (unless --debug)
        if args.debug:
            raise
        say(f"the run stopped: {storage_error_cause(e)} (--debug shows the traceback)")
        return 1
    if summary.noop:
        return 0
    print(summary.render(), flush=True)
    if summary.interrupted:
        say(f"interrupted: {summary.images_ok + summary.images_error} of {summary.images_planned} images committed; "
            "run the same command to resume")
        return 130
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
