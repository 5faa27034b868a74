#!/usr/bin/env python3
"""Tests of the AWS emulator's own semantics (aws-emulator.py), through boto3 like any AWS client.

Run by `cargo xtask test` with the test-server venv's python. Starts its own emulator.
"""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

BLOCK = 524288
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def block_of(seed):
    return hashlib.sha256(seed.encode()).digest() * (BLOCK // 32)


class EmulatorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        port = free_port()
        cls.url = f"http://127.0.0.1:{port}"
        cls.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "aws-emulator.py"), "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(cls.url + "/_emulator/config", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        cls.control("config", {"snapshot_seconds": 0.2})
        kw = dict(
            endpoint_url=cls.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": 1}),
        )
        cls.ec2 = boto3.client("ec2", **kw)
        cls.ebs = boto3.client("ebs", **kw)
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.proc.kill()
        cls.proc.wait()
        cls.tmp.cleanup()

    @classmethod
    def control(cls, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{cls.url}/_emulator/{path}", data=data)
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    def image(self, name, blocks, total=8):
        path = os.path.join(self.tmp.name, name)
        with open(path, "wb") as f:
            f.truncate(total * BLOCK)
            for idx, data in blocks.items():
                f.seek(idx * BLOCK)
                f.write(data)
        return path

    def snapshot(self, vol):
        sid = self.ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
        self.ec2.get_waiter("snapshot_completed").wait(
            SnapshotIds=[sid], WaiterConfig={"Delay": 1, "MaxAttempts": 30}
        )
        return sid

    def all_blocks(self, sid, **kw):
        out, token = [], None
        while True:
            args = dict(SnapshotId=sid, **kw)
            if token:
                args["NextToken"] = token
            r = self.ebs.list_snapshot_blocks(**args)
            out += r["Blocks"]
            token = r.get("NextToken")
            if not token:
                return out

    def test_snapshot_of_image_volume_holds_its_data(self):
        path = self.image("a.img", {0: block_of("a0"), 5: block_of("a5")})
        vol = self.control("volumes", {"image": path})["VolumeId"]
        sid = self.ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
        first = self.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
        self.assertEqual(first["State"], "pending")
        with self.assertRaises(ClientError):
            self.ebs.list_snapshot_blocks(SnapshotId=sid)
        self.ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[sid], WaiterConfig={"Delay": 1})
        r = self.ebs.list_snapshot_blocks(SnapshotId=sid)
        self.assertEqual(r["BlockSize"], BLOCK)
        self.assertEqual(r["VolumeSize"], 1)
        self.assertEqual([b["BlockIndex"] for b in r["Blocks"]], [0, 5])
        got = self.ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=5, BlockToken=r["Blocks"][1]["BlockToken"])
        data = got["BlockData"].read()
        self.assertEqual(data, block_of("a5"))
        self.assertEqual(got["Checksum"], sha(data))
        self.assertEqual(got["ChecksumAlgorithm"], "SHA256")
        self.assertEqual(got["DataLength"], BLOCK)
        # A token of another block is refused; an index the snapshot does not hold is not found.
        with self.assertRaises(ClientError) as e:
            self.ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockToken=r["Blocks"][1]["BlockToken"])
        self.assertEqual(e.exception.response["Reason"], "INVALID_BLOCK_TOKEN")
        with self.assertRaises(ClientError) as e:
            self.ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=3, BlockToken=r["Blocks"][1]["BlockToken"])
        self.assertEqual(e.exception.response["Error"]["Code"], "ResourceNotFoundException")

    def test_changed_blocks_cover_both_snapshots_and_lineage(self):
        path = self.image("b.img", {0: block_of("b0"), 1: block_of("b1"), 2: block_of("b2")})
        vol = self.control("volumes", {"image": path})["VolumeId"]
        s1 = self.snapshot(vol)
        with open(path, "r+b") as f:
            f.seek(1 * BLOCK)
            f.write(block_of("b1-new"))
            f.seek(2 * BLOCK)
            f.write(bytes(BLOCK))  # zeroed: present only in the first snapshot
            f.seek(6 * BLOCK)
            f.write(block_of("b6"))  # present only in the second
        s2 = self.snapshot(vol)
        r = self.ebs.list_changed_blocks(FirstSnapshotId=s1, SecondSnapshotId=s2)
        got = {b["BlockIndex"]: ("FirstBlockToken" in b, "SecondBlockToken" in b) for b in r["ChangedBlocks"]}
        self.assertEqual(got, {1: (True, True), 2: (True, False), 6: (False, True)})
        only_second = self.ebs.list_changed_blocks(SecondSnapshotId=s2)
        self.assertEqual([b["BlockIndex"] for b in only_second["ChangedBlocks"]], [0, 1, 6])
        other = self.control("volumes", {"image": self.image("c.img", {0: block_of("c")})})["VolumeId"]
        s3 = self.snapshot(other)
        with self.assertRaises(ClientError) as e:
            self.ebs.list_changed_blocks(FirstSnapshotId=s1, SecondSnapshotId=s3)
        self.assertEqual(e.exception.response["Reason"], "UNRELATED_SNAPSHOTS")

    def test_pagination(self):
        blocks = {i: block_of(f"p{i}") for i in range(0, 250)}
        vol = self.control("volumes", {"image": self.image("p.img", blocks, total=250)})["VolumeId"]
        sid = self.snapshot(vol)
        pages = self.all_blocks(sid, MaxResults=100)
        self.assertEqual([b["BlockIndex"] for b in pages], list(range(250)))
        r = self.ebs.list_snapshot_blocks(SnapshotId=sid, MaxResults=100, StartingBlockIndex=200)
        self.assertEqual([b["BlockIndex"] for b in r["Blocks"]], list(range(200, 250)))
        self.assertNotIn("NextToken", r)
        with self.assertRaises(ClientError) as e:
            self.ebs.list_snapshot_blocks(SnapshotId=sid, NextToken="Zm9yZ2Vk")
        self.assertEqual(e.exception.response["Reason"], "INVALID_PAGE_TOKEN")

    def test_put_validates_and_child_inherits_parent(self):
        snap = self.ebs.start_snapshot(VolumeSize=1, ClientToken="tok-1")
        self.assertEqual(snap["BlockSize"], BLOCK)
        again = self.ebs.start_snapshot(VolumeSize=1, ClientToken="tok-1")
        self.assertEqual(again["SnapshotId"], snap["SnapshotId"])
        sid = snap["SnapshotId"]
        data = block_of("w")

        def put(idx, body, checksum=None):
            return self.ebs.put_snapshot_block(
                SnapshotId=sid, BlockIndex=idx, BlockData=body, DataLength=len(body),
                Checksum=checksum or sha(body), ChecksumAlgorithm="SHA256",
            )

        for bad in [(0, data, sha(b"x")), (0, data[:4096], None), (2048, data, None)]:
            with self.assertRaises(ClientError) as e:
                put(*bad)
            self.assertEqual(e.exception.response["Error"]["Code"], "ValidationException")
        put(3, data)
        self.assertEqual(
            self.ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=1)["Status"], "pending"
        )
        self.ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[sid], WaiterConfig={"Delay": 1})
        with self.assertRaises(ClientError):
            put(4, data)
        child = self.ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=sid)["SnapshotId"]
        self.ebs.put_snapshot_block(
            SnapshotId=child, BlockIndex=7, BlockData=data, DataLength=BLOCK,
            Checksum=sha(data), ChecksumAlgorithm="SHA256",
        )
        self.ebs.complete_snapshot(SnapshotId=child, ChangedBlocksCount=1)
        self.ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[child], WaiterConfig={"Delay": 1})
        self.assertEqual([b["BlockIndex"] for b in self.all_blocks(child)], [3, 7])
        diff = self.ebs.list_changed_blocks(FirstSnapshotId=sid, SecondSnapshotId=child)
        self.assertEqual([b["BlockIndex"] for b in diff["ChangedBlocks"]], [7])
        # A volume made from the snapshot holds its data: its own snapshot lists the same blocks.
        vol = self.ec2.create_volume(SnapshotId=child, AvailabilityZone="us-east-1a")["VolumeId"]
        self.assertEqual([b["BlockIndex"] for b in self.all_blocks(self.snapshot(vol))], [3, 7])
        # A wrong changed-block count fails the snapshot.
        bad = self.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        self.assertEqual(self.ebs.complete_snapshot(SnapshotId=bad, ChangedBlocksCount=5)["Status"], "error")
        state = self.ec2.describe_snapshots(SnapshotIds=[bad])["Snapshots"][0]["State"]
        self.assertEqual(state, "error")

    def test_faults(self):
        vol = self.control("volumes", {"image": self.image("f.img", {1: block_of("f")})})["VolumeId"]
        sid = self.snapshot(vol)
        token = self.ebs.list_snapshot_blocks(SnapshotId=sid)["Blocks"][0]["BlockToken"]
        self.control("config", {"corrupt_first": 1})
        got = self.ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=1, BlockToken=token)
        self.assertNotEqual(got["Checksum"], sha(got["BlockData"].read()))
        got = self.ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=1, BlockToken=token)
        self.assertEqual(got["Checksum"], sha(got["BlockData"].read()))
        self.control("config", {"throttle_rate": 1.0})
        try:
            with self.assertRaises(ClientError) as e:
                self.ebs.list_snapshot_blocks(SnapshotId=sid)
            self.assertEqual(e.exception.response["Error"]["Code"], "RequestThrottledException")
            with self.assertRaises(ClientError) as e:
                self.ec2.describe_snapshots(SnapshotIds=[sid])
            self.assertEqual(e.exception.response["Error"]["Code"], "RequestLimitExceeded")
        finally:
            self.control("config", {"throttle_rate": 0.0})
        self.assertGreaterEqual(self.control("stats")["Throttled"], 2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
