"""Command line: ``fastsam-batch run MANIFEST.yaml [--overwrite] [--retry-errors [REASONS]] [--break-lease] [--debug]``,
and around a run: ``plan MANIFEST``, ``stats OUTPUT``, ``export-coco OUTPUT --out F``,
``export-sa1b OUTPUT --out DIR``, ``export-webdataset OUTPUT --out DIR``, ``schema``, ``overlay OUTPUT --out DIR``.

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
    ap = argparse.ArgumentParser(prog="fastsam-batch", description="Segment image collections with FastSAM on Ray.",
                                 epilog="Exit status: 0 done; 1 failed (one 'fastsam-batch:' line says why); "
                                        "2 invalid manifest or command line; 130 interrupted (run: the same command "
                                        "resumes).")
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
    plan = sub.add_parser("plan", help="what `run` would do (images to do, done, changed; actors), writing nothing")
    plan.add_argument("manifest", help="job manifest (YAML)")
    plan.add_argument("--overwrite", action="store_true", help="as `run --overwrite` would plan")
    plan.add_argument("--retry-errors", nargs="?", const="all", metavar="REASONS", help="as `run --retry-errors`")
    plan.add_argument("--json", action="store_true", help="print JSON")
    stats = sub.add_parser("stats", help="summarise an output: rows by status, errors, masks, stage times")
    stats.add_argument("output", help="output.uri of a run (local folder or s3://)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("--histogram-png", metavar="PATH",
                       help="also write the histograms of stability_score and masks per image as a PNG here")
    export = sub.add_parser("export-coco", help="the masks as COCO JSON (results for COCOeval, or a dataset)")
    export.add_argument("output", help="output.uri of a run (local folder or s3://)")
    export.add_argument("--out", required=True, help="the JSON file to write")
    export.add_argument("--annotations", action="store_true",
                        help="a COCO dataset (images, annotations, categories) instead of a results list")
    export.add_argument("--coco", metavar="GT.json",
                        help="take image ids (and categories) from this COCO file, matched by file_name")
    export.add_argument("--category-id", type=int, metavar="N",
                        help="category of the masks without one (everything mode); default 1 'object', or with "
                             "--coco an id that file does not use")
    sa1b = sub.add_parser("export-sa1b", help="the masks as SA-1B per-image records (JSON files or tar shards)")
    sa1b.add_argument("output", help="output.uri of a run (local folder or s3://)")
    sa1b.add_argument("--out", required=True, help="folder or s3:// prefix to write into (made when missing)")
    sa1b.add_argument("--tar", action="store_true", help="tar shards sa_000000.tar, ... instead of loose files")
    sa1b.add_argument("--shard-size", type=_positive, default=1000, metavar="N",
                      help="images per tar shard (default 1000; one shard per input shard when the input was tar)")
    sa1b.add_argument("--with-images", action="store_true",
                      help="the images too, beside their records (read from each row's uri)")
    sa1b.add_argument("--manifest", metavar="JOB.yaml",
                      help="read the images with this job's storage_options (default: those the run recorded in "
                           "the output, credentials from the environment)")
    wds = sub.add_parser("export-webdataset", help="the images and masks as WebDataset tar shards")
    wds.add_argument("output", help="output.uri of a run (local folder or s3://)")
    wds.add_argument("--out", required=True, help="folder or s3:// prefix to write into (made when missing)")
    wds.add_argument("--shard-size", type=_positive, default=1000, metavar="N",
                     help="images per shard (default 1000); when the input was tar shards, one shard per input "
                          "shard instead")
    wds.add_argument("--manifest", metavar="JOB.yaml", help="as for export-sa1b")
    for p, what in ((sa1b, "its .json, images and sa_*.tar"), (wds, "its .tar files")):
        p.add_argument("--overwrite", action="store_true",
                       help=f"write into a --out that holds files: an earlier export's files there ({what}) are "
                            "removed first, nothing else (without it, a --out with files is refused)")
    sub.add_parser("schema", help="the manifest's JSON Schema, for editors")
    overlay = sub.add_parser("overlay", help="PNG pictures of sampled images with their masks, and a contact sheet")
    overlay.add_argument("output", help="output.uri of a run (local folder or s3://)")
    overlay.add_argument("--sample", type=int, default=12, help="how many images (default 12)")
    overlay.add_argument("--seed", type=int, default=0, help="which sample (default 0)")
    overlay.add_argument("--out", required=True, help="folder for the pictures")
    overlay.add_argument("--color-by", choices=["mask", "stability", "score"], default="mask",
                         help="a colour per mask (default), or each mask coloured by its stability_score or detection "
                              "score: red 0, yellow 0.5, green 1")
    args = ap.parse_args(argv)
    if args.command != "run":
        return _tool(args)

    loaded = _manifest_and_retry(args)
    if loaded is None:
        return 2
    manifest, retry = loaded

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .console import StderrFilter, quiet_ray_loggers, shutdown_ray

    noise = None
    if not args.debug:
        quiet_ray_loggers()
        noise = StderrFilter()
    try:
        return _run(manifest, args, retry)
    finally:
        if noise is not None:
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                shutdown_ray(ray)  # while the filter still holds stderr: Ray's last lines come now
            noise.close()


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: give 1 or more")
    return n


def say(msg: str) -> int:
    """The one line a failure prints; returns exit status 1."""
    print(f"fastsam-batch: {msg}", file=sys.stderr, flush=True)
    return 1


def _manifest_and_retry(args):
    """`run` / `plan`: (the manifest, --retry-errors' reasons or None), or None once the line
    saying what is invalid has been printed (exit status 2)."""
    from .manifest import ManifestError, load_manifest
    from .schema import ERROR_REASONS

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as e:
        say(str(e))
        return None
    if args.retry_errors is None:
        return manifest, None
    retry = frozenset(r.strip() for r in args.retry_errors.split(",") if r.strip())
    unknown = sorted(retry - set(ERROR_REASONS) - {"all"})
    if not retry or unknown:
        say(f"--retry-errors: unknown error reason {', '.join(unknown) or '(none)'}; give some of "
            f"{', '.join(ERROR_REASONS)} (comma-separated), or nothing for all")
        return None
    return manifest, retry


def _tool(args) -> int:
    """The commands around a run: plan, stats, export-coco, export-sa1b, export-webdataset, schema, overlay."""
    import json
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `fastsam-batch schema | head` ends quietly

    from .storage import Storage

    if args.command == "schema":
        from .manifest import manifest_json_schema

        print(json.dumps(manifest_json_schema(), indent=2))
        return 0
    from .job import JobError
    from .model import CheckpointError
    from .preflight import PreflightError
    from .stats import OutputError
    from .storage import storage_error_cause

    try:
        if args.command == "plan":
            from .job import dry_run, render_dry_run

            loaded = _manifest_and_retry(args)
            if loaded is None:
                return 2
            d = dry_run(*loaded, args.overwrite)
            print(json.dumps(d, indent=2) if args.json else render_dry_run(d))
            return 0
        storage = Storage()
        if args.command == "stats":
            from .stats import check_writable_file, output_stats, render_stats, stats_json

            if args.histogram_png:  # a path that cannot be written is said before the output is read
                check_writable_file(args.histogram_png, "--histogram-png")
            st = output_stats(args.output, storage)
            print(stats_json(st) if args.json else render_stats(st))
            if args.histogram_png:
                from .stats import write_histogram_png

                write_histogram_png(st, args.histogram_png)
                if not args.json:
                    print(f"wrote {args.histogram_png}")
        elif args.command == "export-coco":
            from .exports.coco import export_coco_file

            counts = export_coco_file(args.output, storage, args.out, args.annotations, args.coco, args.category_id)
            print(f"wrote {args.out}: {counts['masks']:,} masks of {counts['images']:,} images"
                  + (f" ({counts['error_rows']:,} error rows left out)" if counts["error_rows"] else "")
                  + (f" ({counts['not_in_coco']:,} images not in {args.coco} left out)" if counts["not_in_coco"] else ""))
            if counts["outside_coco_categories"]:
                print(f"note: {counts['outside_coco_categories']:,} masks are of a category {args.coco} does not have "
                      "(everything-mode masks have none of their own): COCOeval against it scores none of them; "
                      "--category-id N puts the masks without a category in its category N")
        elif args.command in ("export-sa1b", "export-webdataset"):
            from .exports import job_storage
            from .manifest import ManifestError

            try:
                images = job_storage(args.output, storage, args.manifest)
            except ManifestError as e:
                say(f"--manifest: {e}")
                return 2
            if args.command == "export-sa1b":
                from .exports.sa1b import export_sa1b

                counts = export_sa1b(args.output, storage, args.out, args.tar, args.shard_size, args.with_images, images,
                                     overwrite=args.overwrite)
                what = f"{counts['images']:,} records ({counts['masks']:,} masks)" + (
                    f" in {counts['files']:,} shards" if args.tar else f", {counts['files']:,} files")
            else:
                from .exports.webdataset import export_webdataset

                counts = export_webdataset(args.output, storage, args.out, args.shard_size, images,
                                           overwrite=args.overwrite)
                what = (f"{counts['images']:,} samples ({counts['masks']:,} masks) in {counts['files']:,} shards"
                        + (" (one per input tar shard)" if counts["aligned"] else ""))
            print(f"wrote {args.out}: {what}"
                  + (f" ({counts['error_rows']:,} error rows left out)" if counts["error_rows"] else "")
                  + (f" ({counts['duplicates']:,} rows written twice exported once)" if counts["duplicates"] else ""))
            if counts["unavailable"]:  # the rest is written, but the dataset lacks them: not a success
                return say(f"{counts['unavailable']:,} images could not be read and were left out (the rest was "
                           f"written), e.g. " + "; ".join(counts["examples"]))
        elif args.command == "overlay":
            from .overlay import write_overlays

            paths = write_overlays(args.output, storage, args.sample, args.out, args.seed, args.color_by)
            print(f"wrote {len(paths) - 1} pictures and {paths[-1]}")
        return 0
    except (JobError, CheckpointError, PreflightError, OutputError) as e:
        return say(str(e))
    except KeyboardInterrupt:
        say(f"{args.command}: interrupted" + ("; the files it wrote are complete (none is left half-written), run "
                                              "it again to write them all" if args.command.startswith("export-") else ""))
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        return say(f"{args.command}: {storage_error_cause(e)}")


def _run(manifest, args, retry) -> int:
    from .job import JobError, run_job
    from .model import CheckpointError
    from .preflight import PreflightError
    from .storage import storage_error_cause

    try:
        summary = run_job(manifest, overwrite=args.overwrite, log=lambda msg: print(msg, flush=True),
                          break_lease=args.break_lease, retry_errors=retry, debug=args.debug)
    except (JobError, CheckpointError, PreflightError) as e:
        if args.debug:
            raise
        say(str(e))
        return 1
    except KeyboardInterrupt:
        from .console import silence_ray

        silence_ray(args.debug)
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


def console_main() -> None:
    """The ``fastsam-batch`` command: :func:`main`, then the exit with its status without the
    interpreter's teardown. What a normal exit does first is done here too: threads that are not
    daemons joined (``threading._shutdown``), the atexit handlers run (Ray's shutdown among them),
    the streams flushed (a flush that fails makes the status 120, as Python's own exit does). What
    is skipped is the teardown itself, where a library's thread still in Python (pyarrow's I/O
    threads reading through an fsspec file system: a read-ahead or a close finishing after the
    last row was given) is stopped mid-call and aborts the process (SIGABRT, apache/arrow issues
    34314, 39162) after the command did all its work. An exception that escapes :func:`main`
    (``--debug``, a Ctrl-C before a command handles it) prints its traceback as Python would, with
    status 1 (130 for Ctrl-C). In-process callers of :func:`main` are not affected."""
    import atexit
    import os
    import threading
    import traceback

    try:
        status = main()
    except SystemExit as e:  # argparse: --help (0), a bad command line (2)
        status = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 130
    except BaseException:  # noqa: BLE001 - said as Python says it
        traceback.print_exc()
        status = 1
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("message"), as Python would say it
        print(status, file=sys.stderr)
        status = 1
    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
    except KeyboardInterrupt:  # a Ctrl-C while they wait: ended here all the same
        status = 130
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, "closed", False):
            continue
        try:
            stream.flush()
        except OSError:  # a full disk, a broken pipe: what was said is not all there
            status = status or 120
    os._exit(status & 0xFF)


if __name__ == "__main__":
    console_main()
