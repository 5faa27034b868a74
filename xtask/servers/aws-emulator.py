#!/usr/bin/env python3
"""moto server with an EBS direct API that follows the AWS documentation.

Runs moto (S3, EC2, KMS, ...) unchanged and answers the EBS direct APIs itself, on top of moto's
EC2 volumes and snapshots. moto's own EBS module is loose (512-byte blocks, no lineage, no
validation, EC2 snapshots without data); this launcher models what elastio relies on:

* Blocks are 524288 bytes; a volume of N GiB has N * 2048 block indexes.
* Volume data: `POST /_emulator/volumes {"image": PATH}` creates an EC2 volume backed by a local
  image file (read when a snapshot is taken, so tests change a volume by writing the file);
  with `"volume_id"` it backs an existing volume (an instance's root volume) instead. A volume
  created from a snapshot holds that snapshot's blocks; other volumes read as zeros.
* EC2 CreateSnapshot / CreateSnapshots copy the volume's current data (all-zero blocks are not
  stored, as on AWS) and stay `pending`, with progress, for `snapshot_seconds` before `completed`.
* Lineage: snapshots of one volume, volumes made from them and snapshots started with
  ParentSnapshotId share a lineage. ListChangedBlocks between snapshots of different lineages
  fails with ValidationException UNRELATED_SNAPSHOTS; with only SecondSnapshotId it lists every
  block of that snapshot. Changed = written in either snapshot with different content; a block
  present only in the first has no SecondBlockToken.
* ListSnapshotBlocks / ListChangedBlocks: sorted by index, MaxResults 100..10000 (default 10000),
  StartingBlockIndex, opaque NextToken (INVALID_PAGE_TOKEN when forged), ExpiryTime.
* Block tokens are bound to snapshot, index and content; GetSnapshotBlock rejects a wrong token
  (INVALID_BLOCK_TOKEN) and an index the snapshot does not hold (ResourceNotFoundException, 404).
  Responses carry x-amz-Data-Length and a base64 SHA-256 x-amz-Checksum.
* StartSnapshot: BlockSize 524288, ParentSnapshotId (the child starts with the parent's blocks,
  VolumeSize may not shrink), ClientToken (idempotent), Encrypted/KmsKeyArn recorded.
  PutSnapshotBlock validates the snapshot state (pending), index range, length (524288), and the
  SHA-256 checksum. CompleteSnapshot checks x-amz-ChangedBlocksCount against the blocks written:
  a mismatch puts the snapshot in `error`; otherwise it answers `pending` and completes shortly.
* Injected faults (`POST /_emulator/config`): `latency_ms` before every AWS call, `throttle_rate`
  (fraction of EBS/EC2 calls answered with RequestThrottledException / RequestLimitExceeded),
  `corrupt_index` (GetSnapshotBlock of that index always carries a wrong checksum) and
  `corrupt_first` (that many GetSnapshotBlock answers carry a wrong checksum); `hide_changed`
  (ListChangedBlocks leaves out that block index, a lie for sampled verification to catch).
* `GET /_emulator/stats`: calls per EBS action, throttled answers; `POST /_emulator/stats/reset`.
* Instance metadata (IMDSv2 only, as with HttpTokens=required) at `/latest/...`, for the
  instance `imds_instance_id` (in `imds_region`) set with `POST /_emulator/config`: `PUT
  /latest/api/token` (TTL header 1..21600 required) gives a token that every GET must carry
  (401 without); `meta-data/instance-id`, `meta-data/placement/region`,
  `meta-data/placement/availability-zone`, `dynamic/instance-identity/document` and
  `meta-data/block-device-mapping/` (`ami`, `root`, `ebsN`) from moto's instance.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import threading
import time
import uuid
from collections import Counter

from werkzeug.serving import run_simple
from werkzeug.wrappers import Request, Response

from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ec2.models import elastic_block_store as ec2_ebs
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)

BLOCK = 524288
BLOCKS_PER_GIB = (1 << 30) // BLOCK
ZERO = bytes(BLOCK)
TOKEN_KEY = secrets.token_bytes(32)
LOCK = threading.RLock()

CONFIG = {
    "latency_ms": 0,
    "throttle_rate": 0.0,
    "corrupt_index": None,
    "corrupt_first": 0,
    "snapshot_seconds": 0.5,
    "hide_changed": None,
    "imds_instance_id": None,
    "imds_region": "us-east-1",
}
IMDS_TOKENS = {}  # token -> expiry time
STATS = Counter()
BLOBS = {}  # sha256 digest -> block bytes (shared by every snapshot holding that content)


class Snap:
    def __init__(self, sid, size_gib, lineage, blocks, source):
        self.id = sid
        self.size_gib = size_gib
        self.lineage = lineage
        self.blocks = dict(blocks)  # index -> digest
        self.source = source  # "ec2" or "ebs"
        self.status = "pending"
        self.started = time.time()
        self.complete_at = None  # when a pending snapshot becomes completed
        self.written = set()
        self.client_token = None
        self.parent = None
        self.kms_key_arn = None

    def current_status(self):
        if self.status == "pending" and self.complete_at is not None:
            if time.time() >= self.complete_at:
                self.status = "completed"
        return self.status

    def progress(self):
        st = self.current_status()
        if st != "pending" or self.complete_at is None:
            return "100%" if st == "completed" else "0%"
        span = max(self.complete_at - self.started, 1e-6)
        return f"{min(99, int(100 * (time.time() - self.started) / span))}%"


class Vol:
    def __init__(self, lineage, image=None, blocks=None):
        self.lineage = lineage
        self.image = image
        self.blocks = dict(blocks or {})

    def capture(self):
        """The volume's current non-zero blocks, as index -> digest."""
        if self.image is None:
            return dict(self.blocks)
        out = {}
        with open(self.image, "rb") as f:
            idx = 0
            while True:
                data = f.read(BLOCK)
                if not data:
                    break
                if len(data) < BLOCK:
                    data = data + bytes(BLOCK - len(data))
                if data != ZERO:
                    out[idx] = put_blob(data)
                idx += 1
        return out


SNAPS = {}  # snapshot id -> Snap
VOLS = {}  # volume id -> Vol


def put_blob(data):
    digest = hashlib.sha256(data).digest()
    with LOCK:
        BLOBS.setdefault(digest, data)
    return digest


def block_token(sid, idx, digest):
    mac = hmac.new(TOKEN_KEY, f"{sid}:{idx}:".encode() + digest, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:24]).decode()


def new_lineage():
    return uuid.uuid4().hex


# ---- hooks into moto's EC2 volumes and snapshots ------------------------------------------------

_orig_create_volume = ec2_ebs.EBSBackend.create_volume
_orig_create_snapshot = ec2_ebs.EBSBackend.create_snapshot
_orig_delete_snapshot = ec2_ebs.EBSBackend.delete_snapshot
_orig_delete_volume = ec2_ebs.EBSBackend.delete_volume


def create_volume(self, size, zone_name, snapshot_id=None, *args, **kwargs):
    vol = _orig_create_volume(self, size, zone_name, snapshot_id, *args, **kwargs)
    with LOCK:
        snap = SNAPS.get(snapshot_id) if snapshot_id else None
        if snap is not None:
            VOLS[vol.id] = Vol(snap.lineage, blocks=snap.blocks)
        else:
            VOLS[vol.id] = Vol(new_lineage())
    return vol


def create_snapshot(self, volume_id, description, *args, **kwargs):
    snapshot = _orig_create_snapshot(self, volume_id, description, *args, **kwargs)
    vol = VOLS.get(volume_id)
    if vol is None:
        vol = VOLS.setdefault(volume_id, Vol(new_lineage()))
    snap = Snap(snapshot.id, snapshot.volume.size, vol.lineage, vol.capture(), "ec2")
    snap.complete_at = time.time() + float(CONFIG["snapshot_seconds"])
    with LOCK:
        SNAPS[snap.id] = snap
    return snapshot


def delete_snapshot(self, snapshot_id):
    out = _orig_delete_snapshot(self, snapshot_id)
    with LOCK:
        SNAPS.pop(snapshot_id, None)
    return out


def delete_volume(self, volume_id):
    out = _orig_delete_volume(self, volume_id)
    with LOCK:
        VOLS.pop(volume_id, None)
    return out


def _status_get(self):
    snap = SNAPS.get(self.id)
    if snap is None:
        return self.__dict__.get("_status", "completed")
    return snap.current_status()


def _status_set(self, value):
    self.__dict__["_status"] = value


def _progress(self):
    snap = SNAPS.get(self.id)
    return snap.progress() if snap else "100%"


ec2_ebs.EBSBackend.create_volume = create_volume
ec2_ebs.EBSBackend.create_snapshot = create_snapshot
ec2_ebs.EBSBackend.delete_snapshot = delete_snapshot
ec2_ebs.EBSBackend.delete_volume = delete_volume
ec2_ebs.Snapshot.status = property(_status_get, _status_set)
ec2_ebs.Snapshot.progress = property(_progress)


# ---- the EBS direct API -------------------------------------------------------------------------


class AwsError(Exception):
    def __init__(self, status, kind, message, reason=None):
        super().__init__(message)
        self.status, self.kind, self.message, self.reason = status, kind, message, reason


def validation(message, reason):
    return AwsError(400, "ValidationException", message, reason)


def not_found(message, reason="SNAPSHOT_NOT_FOUND"):
    return AwsError(404, "ResourceNotFoundException", message, reason)


def json_response(status, body):
    return Response(json.dumps(body), status=status, content_type="application/json")


def error_response(err):
    body = {"Message": err.message, "message": err.message}
    if err.reason:
        body["Reason"] = err.reason
    resp = json_response(err.status, body)
    resp.headers["x-amzn-ErrorType"] = err.kind
    return resp


def get_snap(sid):
    snap = SNAPS.get(sid)
    if snap is None:
        raise not_found(f"The snapshot '{sid}' does not exist.")
    return snap


def readable_snap(sid):
    snap = get_snap(sid)
    if snap.current_status() != "completed":
        raise validation(f"The snapshot '{sid}' is {snap.current_status()}.", "INVALID_SNAPSHOT_ID")
    return snap


def page_args(req, scope):
    max_results = req.args.get("maxResults")
    if max_results is None:
        max_results = 10000
    else:
        max_results = int(max_results)
        if not 100 <= max_results <= 10000:
            raise validation("MaxResults must be between 100 and 10000.", "INVALID_PARAMETER_VALUE")
    start = int(req.args.get("startingBlockIndex", 0))
    token = req.args.get("pageToken")
    if token:
        try:
            raw = base64.urlsafe_b64decode(token.encode())
            mac, payload = raw[:16], raw[16:]
            good = hmac.new(TOKEN_KEY, payload, hashlib.sha256).digest()[:16]
            state = json.loads(payload)
            if not hmac.compare_digest(mac, good) or state["scope"] != scope:
                raise ValueError
            start = max(start, int(state["next"]))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            raise validation("The pagination token is not valid.", "INVALID_PAGE_TOKEN")
    return max_results, start


def next_token(scope, nxt):
    payload = json.dumps({"scope": scope, "next": nxt}).encode()
    mac = hmac.new(TOKEN_KEY, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac + payload).decode()


def paged(indexes, req, scope):
    max_results, start = page_args(req, scope)
    sel = [i for i in sorted(indexes) if i >= start]
    page, rest = sel[:max_results], sel[max_results:]
    return page, (next_token(scope, rest[0]) if rest else None)


def list_snapshot_blocks(req, sid):
    snap = readable_snap(sid)
    page, token = paged(snap.blocks.keys(), req, f"list:{sid}")
    body = {
        "Blocks": [{"BlockIndex": i, "BlockToken": block_token(sid, i, snap.blocks[i])} for i in page],
        "ExpiryTime": time.time() + 7 * 86400,
        "VolumeSize": snap.size_gib,
        "BlockSize": BLOCK,
    }
    if token:
        body["NextToken"] = token
    return json_response(200, body)


def list_changed_blocks(req, second_id):
    second = readable_snap(second_id)
    first_id = req.args.get("firstSnapshotId")
    first = readable_snap(first_id) if first_id else None
    if first is not None and first.lineage != second.lineage:
        raise validation(
            f"The snapshots '{first_id}' and '{second_id}' are not of the same volume lineage.",
            "UNRELATED_SNAPSHOTS",
        )
    a = first.blocks if first else {}
    b = second.blocks
    changed = {i for i in set(a) | set(b) if a.get(i) != b.get(i)}
    # A lying changed list (tests of sampled verification).
    changed.discard(CONFIG["hide_changed"])
    page, token = paged(changed, req, f"changed:{first_id}:{second_id}")
    out = []
    for i in page:
        entry = {"BlockIndex": i}
        if i in a:
            entry["FirstBlockToken"] = block_token(first_id, i, a[i])
        if i in b:
            entry["SecondBlockToken"] = block_token(second_id, i, b[i])
        out.append(entry)
    body = {
        "ChangedBlocks": out,
        "ExpiryTime": time.time() + 7 * 86400,
        "VolumeSize": second.size_gib,
        "BlockSize": BLOCK,
    }
    if token:
        body["NextToken"] = token
    return json_response(200, body)


def get_snapshot_block(req, sid, idx):
    snap = readable_snap(sid)
    digest = snap.blocks.get(idx)
    if digest is None:
        raise not_found(f"Block {idx} of snapshot '{sid}' does not exist.", "DEPENDENCY_RESOURCE_NOT_FOUND")
    token = req.args.get("blockToken", "")
    if not hmac.compare_digest(token, block_token(sid, idx, digest)):
        raise validation(f"The block token for block {idx} of '{sid}' is not valid.", "INVALID_BLOCK_TOKEN")
    data = BLOBS[digest]
    checksum = digest
    with LOCK:
        if CONFIG["corrupt_first"] > 0:
            CONFIG["corrupt_first"] -= 1
            checksum = hashlib.sha256(b"corrupt" + digest).digest()
    if CONFIG["corrupt_index"] is not None and int(CONFIG["corrupt_index"]) == idx:
        checksum = hashlib.sha256(b"corrupt" + digest).digest()
    resp = Response(data, status=200, content_type="application/octet-stream")
    resp.headers["x-amz-Data-Length"] = str(len(data))
    resp.headers["x-amz-Checksum"] = base64.b64encode(checksum).decode()
    resp.headers["x-amz-Checksum-Algorithm"] = "SHA256"
    return resp


def start_snapshot(req, region):
    try:
        args = json.loads(req.get_data() or b"{}")
    except json.JSONDecodeError:
        raise validation("The request body is not valid JSON.", "INVALID_PARAMETER_VALUE")
    size = args.get("VolumeSize")
    if not isinstance(size, int) or size < 1 or size > 65536:
        raise validation("VolumeSize must be 1..65536 GiB.", "INVALID_VOLUME_SIZE")
    token = args.get("ClientToken")
    with LOCK:
        if token:
            for snap in SNAPS.values():
                if snap.client_token == token:
                    return start_answer(snap, args)
        parent = None
        if args.get("ParentSnapshotId"):
            parent = readable_snap(args["ParentSnapshotId"])
            if size < parent.size_gib:
                raise validation("VolumeSize is smaller than the parent snapshot's.", "INVALID_VOLUME_SIZE")
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
    # An EC2 snapshot record (DescribeSnapshots, CreateVolume, DeleteSnapshot) on a placeholder
    # volume, as AWS shows vol-ffffffff for snapshots made through the EBS direct APIs.
    placeholder = _orig_create_volume(backend, size, f"{region}a")
    snapshot = _orig_create_snapshot(backend, placeholder.id, args.get("Description", ""))
    backend.volumes.pop(placeholder.id, None)
    tags = {t["Key"]: t["Value"] for t in args.get("Tags", [])}
    if tags:
        snapshot.add_tags(tags)
    snap = Snap(
        snapshot.id,
        size,
        parent.lineage if parent else new_lineage(),
        parent.blocks if parent else {},
        "ebs",
    )
    snap.client_token = token
    snap.parent = parent.id if parent else None
    snap.kms_key_arn = args.get("KmsKeyArn")
    with LOCK:
        SNAPS[snap.id] = snap
    return start_answer(snap, args)


def start_answer(snap, args):
    body = {
        "SnapshotId": snap.id,
        "OwnerId": DEFAULT_ACCOUNT_ID,
        "Status": snap.current_status(),
        "StartTime": snap.started,
        "VolumeSize": snap.size_gib,
        "BlockSize": BLOCK,
        "Tags": args.get("Tags", []),
        "Description": args.get("Description", ""),
    }
    if snap.parent:
        body["ParentSnapshotId"] = snap.parent
    if snap.kms_key_arn:
        body["KmsKeyArn"] = snap.kms_key_arn
    return json_response(201, body)


def put_snapshot_block(req, sid, idx):
    snap = get_snap(sid)
    if snap.source != "ebs" or snap.current_status() != "pending":
        raise validation(f"The snapshot '{sid}' is not accepting writes.", "INVALID_SNAPSHOT_ID")
    if idx < 0 or idx >= snap.size_gib * BLOCKS_PER_GIB:
        raise validation(f"Block index {idx} is beyond the volume size.", "INVALID_BLOCK")
    data = req.get_data()
    length = req.headers.get("x-amz-Data-Length")
    if length is None or int(length) != len(data) or len(data) != BLOCK:
        raise validation(f"Blocks must be {BLOCK} bytes (got {len(data)}).", "INVALID_BLOCK")
    if req.headers.get("x-amz-Checksum-Algorithm") != "SHA256":
        raise validation("ChecksumAlgorithm must be SHA256.", "INVALID_PARAMETER_VALUE")
    digest = hashlib.sha256(data).digest()
    if req.headers.get("x-amz-Checksum") != base64.b64encode(digest).decode():
        raise validation(f"The checksum of block {idx} does not match its data.", "INVALID_BLOCK")
    with LOCK:
        BLOBS.setdefault(digest, data)
        snap.blocks[idx] = digest
        snap.written.add(idx)
    resp = Response(b"{}", status=201, content_type="application/json")
    resp.headers["x-amz-Checksum"] = base64.b64encode(digest).decode()
    resp.headers["x-amz-Checksum-Algorithm"] = "SHA256"
    return resp


def complete_snapshot(req, sid):
    snap = get_snap(sid)
    if snap.source != "ebs" or snap.current_status() != "pending" or snap.complete_at:
        raise validation(f"The snapshot '{sid}' is not pending.", "INVALID_SNAPSHOT_ID")
    count = req.headers.get("x-amz-ChangedBlocksCount")
    if count is None:
        raise validation("ChangedBlocksCount is required.", "INVALID_PARAMETER_VALUE")
    with LOCK:
        if int(count) != len(snap.written):
            snap.status = "error"
            return json_response(202, {"Status": "error"})
        snap.complete_at = time.time() + min(0.2, float(CONFIG["snapshot_seconds"]))
    return json_response(202, {"Status": "pending"})


ROUTES = [
    ("POST", re.compile(r"^/snapshots$"), "StartSnapshot"),
    ("POST", re.compile(r"^/snapshots/completion/([^/]+)$"), "CompleteSnapshot"),
    ("GET", re.compile(r"^/snapshots/([^/]+)/changedblocks$"), "ListChangedBlocks"),
    ("GET", re.compile(r"^/snapshots/([^/]+)/blocks$"), "ListSnapshotBlocks"),
    ("GET", re.compile(r"^/snapshots/([^/]+)/blocks/(\d+)$"), "GetSnapshotBlock"),
    ("PUT", re.compile(r"^/snapshots/([^/]+)/blocks/(\d+)$"), "PutSnapshotBlock"),
]


def ebs_call(req, region):
    for method, pattern, action in ROUTES:
        m = pattern.match(req.path)
        if m and req.method == method:
            break
    else:
        raise AwsError(404, "ResourceNotFoundException", f"No EBS action at {req.method} {req.path}")
    STATS[action] += 1
    g = m.groups()
    if action == "StartSnapshot":
        return start_snapshot(req, region)
    if action == "CompleteSnapshot":
        return complete_snapshot(req, g[0])
    if action == "ListChangedBlocks":
        return list_changed_blocks(req, g[0])
    if action == "ListSnapshotBlocks":
        return list_snapshot_blocks(req, g[0])
    if action == "GetSnapshotBlock":
        return get_snapshot_block(req, g[0], int(g[1]))
    return put_snapshot_block(req, g[0], int(g[1]))


def control(req):
    path = req.path[len("/_emulator") :]
    if path == "/config" and req.method == "POST":
        with LOCK:
            CONFIG.update(json.loads(req.get_data()))
        return json_response(200, CONFIG)
    if path == "/config":
        return json_response(200, CONFIG)
    if path == "/stats" and req.method == "GET":
        return json_response(200, dict(STATS))
    if path == "/stats/reset" and req.method == "POST":
        with LOCK:
            STATS.clear()
        return json_response(200, {})
    if path == "/volumes" and req.method == "POST":
        args = json.loads(req.get_data())
        image = os.path.abspath(args["image"])
        if args.get("volume_id"):
            # Back an existing volume (e.g. an instance's root volume) with the image.
            with LOCK:
                vol = VOLS.get(args["volume_id"])
                if vol is None:
                    return json_response(404, {"Message": f"no volume {args['volume_id']}"})
                vol.image = image
            return json_response(200, {"VolumeId": args["volume_id"]})
        region = args.get("region", "us-east-1")
        size = max(1, -(-os.path.getsize(image) // (1 << 30)))
        backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
        vol = backend.create_volume(size=size, zone_name=args.get("zone", f"{region}a"))
        if args.get("tags"):
            vol.add_tags(args["tags"])
        with LOCK:
            VOLS[vol.id].image = image
        return json_response(200, {"VolumeId": vol.id, "Size": size})
    return json_response(404, {"Message": f"unknown control call {req.method} {req.path}"})


def imds(req):
    """The instance metadata service, IMDSv2 only."""
    text = lambda body, status=200: Response(body, status=status, content_type="text/plain")
    if req.path == "/latest/api/token":
        if req.method != "PUT":
            return text("", 405)
        ttl = req.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return text("", 400)
        token = secrets.token_urlsafe(32)
        with LOCK:
            IMDS_TOKENS[token] = time.time() + int(ttl)
        resp = text(token)
        resp.headers["X-aws-ec2-metadata-token-ttl-seconds"] = ttl
        return resp
    if req.method != "GET":
        return text("", 405)
    with LOCK:
        expiry = IMDS_TOKENS.get(req.headers.get("X-aws-ec2-metadata-token", ""))
        STATS["IMDS"] += 1
    if expiry is None or expiry < time.time():
        return text("", 401)
    region, iid = CONFIG["imds_region"], CONFIG["imds_instance_id"]
    if not iid:
        return text("", 404)
    try:
        inst = ec2_backends[DEFAULT_ACCOUNT_ID][region].get_instance(iid)
    except Exception:
        return text("", 404)
    az = inst._placement.zone
    path = req.path[len("/latest/"):]
    bdm = sorted(inst.block_device_mapping.items())
    names = {"ami": inst.root_device_name, "root": inst.root_device_name}
    for i, (dev, _) in enumerate(d for d in bdm if d[0] != inst.root_device_name):
        names[f"ebs{i + 1}"] = dev
    if path == "meta-data/instance-id":
        return text(iid)
    if path == "meta-data/placement/region":
        return text(region)
    if path == "meta-data/placement/availability-zone":
        return text(az)
    if path == "dynamic/instance-identity/document":
        doc = {"instanceId": iid, "region": region, "availabilityZone": az,
               "accountId": DEFAULT_ACCOUNT_ID, "instanceType": inst.instance_type,
               "imageId": inst.image_id, "architecture": "x86_64"}
        return Response(json.dumps(doc), status=200, content_type="application/json")
    if path == "meta-data/block-device-mapping/":
        return text("\n".join(names))
    if path.startswith("meta-data/block-device-mapping/") and path.rsplit("/", 1)[1] in names:
        return text(names[path.rsplit("/", 1)[1]].removeprefix("/dev/"))
    return text("", 404)


SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request")


class Emulator:
    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        req = Request(environ)
        if req.path.startswith("/_emulator/"):
            return control(req)(environ, start_response)
        if req.path.startswith("/latest/"):
            return imds(req)(environ, start_response)
        m = SCOPE.search(req.headers.get("Authorization", ""))
        region, service = (m.group(1), m.group(2)) if m else ("us-east-1", "")
        if service in ("ebs", "ec2"):
            if CONFIG["latency_ms"]:
                time.sleep(float(CONFIG["latency_ms"]) / 1000)
            if CONFIG["throttle_rate"] and random.random() < float(CONFIG["throttle_rate"]):
                with LOCK:
                    STATS["Throttled"] += 1
                if service == "ebs":
                    err = AwsError(400, "RequestThrottledException", "Rate exceeded.", "ACCOUNT_THROTTLED")
                    return error_response(err)(environ, start_response)
                body = (
                    "<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error>"
                    "<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
                    "</Error></Errors><RequestID>throttled</RequestID></Response>"
                )
                return Response(body, status=503, content_type="text/xml")(environ, start_response)
        if service == "ebs":
            try:
                resp = ebs_call(req, region)
            except AwsError as err:
                resp = error_response(err)
            return resp(environ, start_response)
        return self.app(environ, start_response)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        args.host, args.port, Emulator(app), threaded=True, request_handler=MotoRequestHandler
    )


if __name__ == "__main__":
    main()
