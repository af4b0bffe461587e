"""Command line: ``fastsam-batch run MANIFEST.yaml [--overwrite] [--break-lease]``.

Exit status: 0 the run finished (error rows included); 1 the run failed (error budget exceeded,
rows missing, or a job-level error); 2 the manifest or the command line is invalid.
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
    run.add_argument("--overwrite", action="store_true", help="replace Parquet files already in output.uri")
    run.add_argument("--break-lease", action="store_true",
                     help="take over output.uri's lease from a run that is gone (see README: one writer per output)")
    args = ap.parse_args(argv)

    from .manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as e:
        print(f"fastsam-batch: {e}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .model import CheckpointError
    from .job import JobError, run_job

    try:
        summary = run_job(manifest, overwrite=args.overwrite, log=lambda msg: print(msg, flush=True),
                          break_lease=args.break_lease)
    except (JobError, CheckpointError) as e:
        print(f"fastsam-batch: {e}", file=sys.stderr)
        return 1
    print(summary.render(), flush=True)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
