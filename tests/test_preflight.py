"""Preflight of what the writer actors need (issue 23): where their output can be written from, and
the S3 permissions that staging files as multipart uploads adds.

- A local ``output.uri`` through a Ray client connection (``ray://``) is refused at once, on the
  address's form (no Ray client is installed here, nor needed: nothing is joined).
- S3: every run lists the open multipart uploads under its output (s3:ListBucketMultipartUploads)
  and aborts some (s3:AbortMultipartUpload). A moto server of this module's own with IAM
  authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``, as tests/test_failing_well.py) and users
  whose policy denies one of those: the run fails in one line naming the permission, before
  anything is written. A store that answers ListMultipartUploads with 501 NotImplemented (a small
  HTTP server of this module's own, speaking S3's error XML) is named as such.
"""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import CHECKPOINT, free_port, moto_server, run_cli, save_shapes
from fastsam_batch.preflight import PreflightError, check_output_placement, check_uploads
from fastsam_batch.storage import Storage

BUCKET = "pf-out"


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastsam-batch: "), r.stderr
    return lines[0]


def manifest(path, images, output_uri: str):
    path.write_text(yaml.safe_dump({
        "name": "preflight", "input": {"uri": str(images)},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "cpu"},
        "output": {"uri": output_uri}, "runtime": {"batch_size": 2, "num_actors": 1}}))
    return path


# A local output through ray:// ---------------------------------------------------------------------

def test_a_local_output_through_a_ray_client_address_is_refused_on_its_form():
    with pytest.raises(PreflightError) as e:
        check_output_placement("ray://head:10001", "/data/masks")
    line = str(e.value)
    assert line.startswith("output.uri '/data/masks': a local output cannot be written through a Ray client "
                           "connection (runtime.ray_address / RAY_ADDRESS 'ray://head:10001')"), line
    assert "s3://" in line and "HEAD:6379" in line and "ray job submit" in line and "\n" not in line
    with pytest.raises(PreflightError):
        check_output_placement("ray://head:10001", "file:///data/masks")
    # what the writers can write: an object store through a client, anything from inside the cluster
    check_output_placement("ray://head:10001", "s3://bucket/masks/")
    check_output_placement("head:6379", "/data/masks")
    check_output_placement("auto", "/data/masks")
    check_output_placement(None, "/data/masks")


def test_run_and_plan_refuse_it_before_any_work(tmp_path):
    """As a user meets it: RAY_ADDRESS=ray://... and a local output. Nothing listens at that address
    and no Ray client is installed: the line comes from the address's form, before the output is
    made, the checkpoint loaded or a cluster asked."""
    images = tmp_path / "imgs"
    save_shapes(images, [8301])
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.yaml", images, str(out))
    address = f"ray://127.0.0.1:{free_port()}"
    for command in ("run", "plan"):
        r = run_cli(command, str(m), env={"RAY_ADDRESS": address})
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line(r)
        assert line.startswith(f"fastsam-batch: output.uri {str(out)!r}: a local output cannot be written through a "
                               f"Ray client connection (runtime.ray_address / RAY_ADDRESS {address!r})"), line
        assert not out.exists()


# S3: the multipart permissions ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """A moto server that checks signatures and IAM policies: three unauthenticated IAM calls make
    an administrator; then users allowed everything but ListBucketMultipartUploads, or but
    AbortMultipartUpload, and one allowed everything."""
    import boto3

    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="AKIABOOTSTRAP", aws_secret_access_key="x",
                           region_name="us-east-1")
        iam.create_user(UserName="admin")
        admin = iam.create_access_key(UserName="admin")["AccessKey"]
        allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        iam.put_user_policy(UserName="admin", PolicyName="all",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow_all]}))
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id=admin["AccessKeyId"],
                           aws_secret_access_key=admin["SecretAccessKey"], region_name="us-east-1")
        users = {}
        for name, denied in (("full", None), ("nolist", "s3:ListBucketMultipartUploads"),
                             ("noabort", "s3:AbortMultipartUpload")):
            iam.create_user(UserName=name)
            key = iam.create_access_key(UserName=name)["AccessKey"]
            statements = [allow_all] + ([{"Effect": "Deny", "Action": denied, "Resource": "*"}] if denied else [])
            iam.put_user_policy(UserName=name, PolicyName="p",
                                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
            users[name] = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=admin["AccessKeyId"],
                     aws_secret_access_key=admin["SecretAccessKey"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield users


def storage_of(env: dict) -> Storage:
    return Storage({"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
                    "endpoint_url": env["AWS_ENDPOINT_URL"]}).for_checks()


def test_the_multipart_permissions_pass_when_granted(iam_s3):
    check_uploads("output.uri", f"s3://{BUCKET}/masks/", storage_of(iam_s3["full"]))
    check_uploads("output.uri", f"s3://{BUCKET}", storage_of(iam_s3["full"]))  # the bucket's root


def test_a_denied_abort_names_its_permission(iam_s3):
    with pytest.raises(PreflightError) as e:
        check_uploads("output.uri", f"s3://{BUCKET}/masks/", storage_of(iam_s3["noabort"]))
    assert str(e.value).startswith(f"output.uri 's3://{BUCKET}/masks/': access denied to AbortMultipartUpload "
                                   "(403 AccessDenied): the credentials need s3:AbortMultipartUpload"), str(e.value)


def test_a_run_without_the_listing_permission_fails_in_one_line_before_writing(iam_s3, tmp_path):
    """The run as a user starts it, with credentials that may put, get, list and delete but not list
    multipart uploads: one line naming s3:ListBucketMultipartUploads, exit 1, no lease taken,
    nothing left under the output (the probe object put and deleted before), no secret shown."""
    import boto3

    images = tmp_path / "imgs"
    save_shapes(images, [8302])
    env = iam_s3["nolist"]
    m = manifest(tmp_path / "m.yaml", images, f"s3://{BUCKET}/denied/")
    r = run_cli("run", str(m), env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_line(r)
    assert line == (f"fastsam-batch: output.uri 's3://{BUCKET}/denied/': access denied to ListMultipartUploads (403 "
                    "AccessDenied): the credentials need s3:ListBucketMultipartUploads on the bucket (a run stages "
                    "each file as a multipart upload and aborts those left open; README, \"S3 permissions\")"), line
    assert env["AWS_SECRET_ACCESS_KEY"] not in r.stdout + r.stderr
    full = iam_s3["full"]
    s3 = boto3.client("s3", endpoint_url=full["AWS_ENDPOINT_URL"], aws_access_key_id=full["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=full["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="denied/")["KeyCount"] == 0
    r = run_cli("plan", str(m), env=env)  # plan, which writes nothing, says it too
    assert r.returncode == 1 and "access denied to ListMultipartUploads" in one_line(r), r.stderr


class _NoMultipartStore:
    """An S3-compatible endpoint that does not implement ListMultipartUploads: ``GET /bucket?uploads``
    is answered 501 NotImplemented with S3's error XML (as such stores answer an operation they lack);
    anything else 404 NoSuchKey. Counts the listings asked for."""

    def __init__(self):
        store = self
        self.listings = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if "uploads" in [kv.split("=")[0] for kv in self.path.partition("?")[2].split("&")]:
                    store.listings += 1
                    status, code = 501, "NotImplemented"
                else:
                    status, code = 404, "NoSuchKey"
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>not here'
                        f"</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_store_without_multipart_listing_is_named():
    with _NoMultipartStore() as store:
        storage = Storage({"key": "k", "secret": "s", "endpoint_url": store.url}).for_checks()
        with pytest.raises(PreflightError) as e:
            check_uploads("output.uri", "s3://any/masks/", storage)
    assert store.listings >= 1
    assert str(e.value).startswith("output.uri 's3://any/masks/': the store does not implement ListMultipartUploads "
                                   "(501 NotImplemented), which a run needs"), str(e.value)


def test_a_local_output_needs_no_multipart_permission(tmp_path):
    check_uploads("output.uri", str(tmp_path / "out"), Storage())  # nothing asked of anyone
    assert not (tmp_path / "out").exists()
