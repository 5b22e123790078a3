"""The S3-compatible object store (boto3; the ``walstore[s3]`` extra; nothing else imports it).

Owns the boto3 client setup and every S3 call replication makes.  Choices:
- checksum calculation and validation "when_required": the AWS SDK's default request
  checksums break R2, B2 and other S3-compatible servers;
- the client's "standard" retry mode (exponential backoff with jitter) for each request,
  on top of which the shipper retries whole rounds with its own backoff; made inside
  ``one_shot_requests`` (an operator's one-shot command), a connection that cannot be made
  to a server that has never answered is not retried, by either;
- conditional writes with ``put_object(IfNoneMatch="*")`` / ``IfMatch=etag`` (``upload_file``
  rejects those), and for large bodies a multipart upload completed with the same
  condition, aborted on failure; leftovers of uploads cut short are aborted by
  :meth:`S3Target.cleanup_uploads` (the lease holder runs it when it starts);
- credentials from the standard chain only (boto3's own resolution); nothing here reads,
  logs or stores them, and error messages carry only the operation, key and error code.
"""
from __future__ import annotations

import collections
import io
from typing import BinaryIO

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from .options import ReplicateOptions
from .targets import (NOT_MODIFIED, PreconditionFailed, TargetError, _shown, check_endpoint,
                      display_url, in_replica_layout, one_shot)

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                    "Throttling", "ThrottlingException", "RequestTimeTooSkewed",
                    "OperationAborted", "ConditionalRequestConflict"}


class S3Target:
    server_conditions = True  # If-None-Match / If-Match are the server's to enforce: the
    # lease checks that it does (see Lease._check_enforced)
    _shared = False  # a copy ``enclosing`` made, sharing this one's client: close() leaves it

    def __init__(self, bucket: str, prefix: str, options: ReplicateOptions | None = None) -> None:
        opts = options or ReplicateOptions.from_any()
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self.multipart_threshold = opts.multipart_threshold
        self.part_size = opts.part_size
        self.requests: collections.Counter = collections.Counter()
        config = Config(request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"mode": "standard",  # (attempts, the first included:
                                 "total_max_attempts": opts.max_attempts},  # not retries)
                        connect_timeout=opts.connect_timeout, read_timeout=opts.read_timeout,
                        s3={"addressing_style": opts.addressing_style})
        check_endpoint(opts.endpoint_url)
        try:
            # (the session reads the config files and AWS_PROFILE: a profile that does not
            # exist or a config file it cannot parse escaped open() and restore() as a bare
            # botocore ProfileNotFound / ConfigParseError: audit 56)
            session = boto3.session.Session()
            self.client = session.client("s3", endpoint_url=opts.endpoint_url,
                                         region_name=opts.region, config=config)
        except (ValueError, bexc.BotoCoreError) as e:  # (a region it cannot use, ...)
            why = _safe(str(e)).strip().rstrip(":").strip()  # (a credential process's
            raise TargetError(f"cannot set up the S3 client for {self.url}: "  # own text
                              f"{type(e).__name__}" + (f": {why}" if why else ""),  # may
                              False) from None  # be empty: "...custom-process: ")
        self.client.meta.events.register("before-send.s3", self._count)
        # whether the server has answered a request of this client ([bool]: shared with
        # the copies ``enclosing`` makes); made for a one-shot command, a connection that
        # cannot be made before it has is not retried (see targets.one_shot_requests),
        # and the flag is the command's, shared by every client it makes
        command = one_shot()
        self._answered = command if command is not None else [False]
        self._one_shot = command is not None
        self.client.meta.events.register_first("needs-retry.s3", self._retry_unreached)
        self.read_timeout = opts.read_timeout
        # the server requests go to, for messages (an endpoint from AWS_ENDPOINT_URL or a
        # config file, forgotten there, was never named: "cannot reach the server")
        self.server = display_url(getattr(self.client.meta, "endpoint_url", None) or "") \
            or "the S3 endpoint"

    def _count(self, request=None, **_kw) -> None:
        method = getattr(request, "method", "?")
        if method == "GET" and "list-type=" in getattr(request, "url", ""):
            method = "LIST"
        self.requests[method] += 1

    def _retry_unreached(self, response=None, caught_exception=None, **_kw) -> None:
        """The client's hook before it decides on a retry (after every attempt, first of
        its handlers): notes an answer of the server; in a one-shot command, re-raises a
        connection that could not be made to a server never answered, ending the request
        there (the client's standard retry handler is not asked)."""
        if response is not None:
            self._answered[0] = True
        elif self._unreached(caught_exception):
            raise caught_exception

    def _unreached(self, e: BaseException | None) -> bool:
        """``e`` is a connection that could not be made (refused, an unknown host, or not
        accepted within ``connect_timeout``: a host that drops the connection's packets)
        to a server this one-shot client has never had an answer from.  (A connect
        timeout was retried: 15 attempts of 5 s each before the one-line error.)"""
        return self._one_shot and not self._answered[0] and \
            isinstance(e, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError))

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _fail(self, op: str, key: str, e: Exception, if_match: bool = False) -> TargetError:
        """The TargetError for a failed request.  ``if_match``: a conditional write on an
        object that must exist, which S3 answers 404 (NoSuchKey; NoSuchBucket when the
        bucket went too) once it is gone: the condition failed, as on ``file://`` (a
        deleted lease was retried forever as a server error, state "running")."""
        if isinstance(e, bexc.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 412 or code == "PreconditionFailed":
                return PreconditionFailed(f"{op} {self.url}/{key}: precondition failed")
            if if_match and code in ("NoSuchKey", "NoSuchBucket"):
                return PreconditionFailed(f"{op} {self.url}/{key}: the object does not exist "
                                          f"({code}, HTTP {status})")
            if code == "NoSuchBucket":
                return TargetError(f"{op} {self.url}/{key}: NoSuchBucket (HTTP {status}): "
                                   f"bucket {self.bucket} does not exist", False)
            transient = status >= 500 or status == 429 or code in _TRANSIENT_CODES
            return TargetError(f"{op} {self.url}/{key}: {code} (HTTP {status})", transient)
        if isinstance(e, (bexc.ConnectionError, bexc.HTTPClientError)):
            server = getattr(self, "server", "the S3 endpoint")
            if isinstance(e, bexc.ReadTimeoutError):  # (reached: it said "cannot reach")
                why = (f"the server at {server} did not answer within the read timeout "
                       f"({self.read_timeout:g} s)")
            elif isinstance(e, bexc.ConnectionError):
                why = f"cannot reach the server at {server}"
            else:
                why = f"the connection to the server at {server} broke off"
            return TargetError(f"{op} {self.url}/{key}: {type(e).__name__}: {why}",
                               not self._unreached(e))
        if isinstance(e, bexc.NoCredentialsError):
            return TargetError(f"{op} {self.url}/{key}: no AWS credentials found in the "
                               f"standard chain (environment, config files, roles)", False)
        if isinstance(e, bexc.BotoCoreError):
            return TargetError(f"{op} {self.url}/{key}: {type(e).__name__}", True)
        return TargetError(f"{op} {self.url}/{key}: {type(e).__name__}", True)

    @staticmethod
    def _code(e: Exception) -> str:
        if isinstance(e, bexc.ClientError):
            return str(e.response.get("Error", {}).get("Code", ""))
        return ""

    @staticmethod
    def _status(e: Exception) -> int:
        if isinstance(e, bexc.ClientError):
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return 0

    def get(self, key: str, max_bytes: int, if_none_match: str | None = None):
        buf = io.BytesIO()
        got = self.download(key, buf, max_bytes, if_none_match)
        if got is None or got == NOT_MODIFIED:
            return got
        return buf.getvalue(), got[1]

    def download(self, key: str, f: BinaryIO, max_bytes: int, if_none_match: str | None = None):
        """Stream the object into ``f`` (never more than ``max_bytes``): (size, etag), None
        when absent, NOT_MODIFIED when its etag is ``if_none_match``."""
        kw = {"IfNoneMatch": if_none_match} if if_none_match else {}
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kw)
        except Exception as e:
            status = self._status(e)
            if status == 404 and self._code(e) != "NoSuchBucket":
                return None
            if status == 304:
                return NOT_MODIFIED
            raise self._fail("GET", key, e) from None
        body = r["Body"]
        n = 0
        try:
            if r.get("ContentLength", 0) > max_bytes:
                raise TargetError(f"object {key} is larger than the {max_bytes} byte bound", False)
            for chunk in body.iter_chunks(1 << 20):
                n += len(chunk)
                if n > max_bytes:
                    raise TargetError(f"object {key} is larger than {max_bytes} bytes", False)
                f.write(chunk)
        except TargetError:
            raise
        except Exception as e:
            raise self._fail("GET", key, e) from None
        finally:
            body.close()
        return n, r.get("ETag", "")

    def put(self, key: str, body, *, if_none_match: bool = False, if_match: str | None = None,
            progress=None):
        """``progress``: called with the bytes sent so far (after each part of a multipart
        upload, once after a single PUT)."""
        cond = {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        elif if_match is not None:
            cond["IfMatch"] = if_match
        size = len(body) if isinstance(body, (bytes, bytearray)) else _remaining(body)
        if size > self.multipart_threshold:
            if isinstance(body, (bytes, bytearray)):
                # (a lease or manifest past the threshold: the parts are read from a
                # stream; ``bytes.read`` raised AttributeError and no round ever shipped)
                body = io.BytesIO(body)
            return self._multipart(key, body, cond, progress)
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body,
                                       ContentLength=size, **cond)
        except Exception as e:
            raise self._fail("PUT", key, e, if_match=if_match is not None) from None
        if progress is not None:
            progress(size)
        return r.get("ETag", "")

    def _multipart(self, key: str, body: BinaryIO, cond: dict, progress=None) -> str:
        try:
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._fail("CreateMultipartUpload", key, e) from None
        uid = upload["UploadId"]
        parts = []
        sent = 0
        try:
            number = 1
            while True:
                chunk = body.read(self.part_size)  # one part in memory at a time
                if not chunk:
                    break
                r = self.client.upload_part(Bucket=self.bucket, Key=self._key(key), UploadId=uid,
                                            PartNumber=number, Body=chunk)
                parts.append({"PartNumber": number, "ETag": r["ETag"]})
                number += 1
                sent += len(chunk)
                if progress is not None:
                    progress(sent)
            r = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self._key(key), UploadId=uid,
                MultipartUpload={"Parts": parts}, **cond)
            return r.get("ETag", "")
        except Exception as e:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key),
                                                   UploadId=uid)
            except Exception:
                pass  # cleanup_uploads aborts it later
            if isinstance(e, TargetError):
                raise
            raise self._fail("multipart upload", key, e, if_match="IfMatch" in cond) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if self._status(e) != 404 or self._code(e) == "NoSuchBucket":
                raise self._fail("DELETE", key, e) from None

    def list(self, prefix: str):
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(self.prefix):], obj.get("Size", 0)
        except Exception as e:
            raise self._fail("LIST", prefix, e) from None

    def cleanup_uploads(self) -> int:
        """Abort multipart uploads left under this prefix by a writer that was cut short
        (of this replica's own keys: never another replica's, at a prefix under this one)."""
        n = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for up in page.get("Uploads", ()):
                    if not in_replica_layout(up["Key"][len(self.prefix):]):
                        continue
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"],
                                                       UploadId=up["UploadId"])
                    n += 1
        except Exception as e:
            raise self._fail("ListMultipartUploads", "", e) from None
        return n

    def enclosing(self) -> list[tuple["S3Target", str]]:
        """The prefixes enclosing this one in the bucket, innermost first, down to the
        bucket's root: (a target there, sharing this one's client (closing it does
        nothing), this one's prefix relative to it)."""
        out = []
        parts = self.prefix.strip("/").split("/") if self.prefix else []
        for i in range(len(parts) - 1, -1, -1):
            t = object.__new__(S3Target)
            t.__dict__.update(self.__dict__)
            t.prefix = "/".join(parts[:i]) + "/" if i else ""
            t.url = f"s3://{self.bucket}/{t.prefix}".rstrip("/")
            t._shared = True
            out.append((t, "/".join(parts[i:])))
        return out

    def close(self) -> None:
        if self._shared:
            return
        try:
            self.client.close()
        except Exception:
            pass


def _remaining(f: BinaryIO) -> int:
    pos = f.tell()
    end = f.seek(0, 2)
    f.seek(pos)
    return end - pos


def _safe(text: str) -> str:
    """A boto3 setup error's text safe to show: an endpoint from the AWS config file
    (not checked by check_endpoint) came back whole in ``Invalid endpoint: <URL>``, user
    info and all (audit 55); the URL, from the first ``: ``, is shown as display_url
    shows one."""
    if "@" not in text and "://" not in text and "?" not in text:
        return text
    head, sep, tail = text.partition(": ")
    return head + sep + _shown(tail) if sep else _shown(text)
