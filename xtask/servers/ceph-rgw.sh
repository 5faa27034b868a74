#!/usr/bin/env bash
# Starts a throw-away single-node Ceph cluster (one monitor, one in-memory OSD) and a radosgw
# S3 endpoint on 127.0.0.1:$RGW_PORT with user testing/testing, all under $DIR.
# Usage: ceph-rgw.sh DIR RGW_PORT MON_PORT. Stop: kill the pids in DIR/run/*.pid.
set -euo pipefail
DIR=$1 RGW_PORT=$2 MON_PORT=$3
rm -rf "$DIR"
mkdir -p "$DIR"/{mon.a,osd.0,log,run}
FSID=$(uuidgen)
CONF=$DIR/ceph.conf
cat > "$CONF" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/\$name.keyring
ms bind ipv4 = true
ms bind ipv6 = false
public addr = 127.0.0.1
public network = 127.0.0.0/8
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
mon data avail crit = 1
mon data avail warn = 2
osd crush chooseleaf type = 0
log file = $DIR/log/\$name.log
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
mon data = $DIR/mon.\$id
osd data = $DIR/osd.\$id
osd objectstore = memstore
memstore device bytes = 6442450944
osd max object size = 134217728
client mount timeout = 30
rados mon op timeout = 30
[client.rgw]
# tcp_nodelay: without it beast holds the tail of each response for the client's delayed ACK,
# about 40 ms per request (an S3 vault open took 0.42 s instead of 0.15 s).
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
rgw dns name = localhost
rgw enable usage log = false
# Beast serves requests as coroutines: a few threads per core do; 64 cost RGW ~13 % more CPU in
# context switches during a backup, CPU the client on the same two cores then lacks.
rgw thread pool size = 8
CONF
export CEPH_CONF=$CONF
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
ceph-authtool --create-keyring "$DIR/mon.a.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$DIR/mon.a.keyring" --import-keyring "$DIR/client.admin.keyring" >/dev/null
ceph-mon --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.a.keyring"
ceph-mon -i a
for _ in $(seq 1 30); do ceph mon stat >/dev/null 2>&1 && break; sleep 0.5; done
ceph osd create >/dev/null
ceph-authtool --create-keyring "$DIR/osd.0.keyring" --gen-key -n osd.0 >/dev/null
ceph auth add osd.0 osd 'allow *' mon 'allow profile osd' -i "$DIR/osd.0.keyring" >/dev/null
ceph-osd -i 0 --mkfs 2>/dev/null
ceph osd crush add osd.0 1.0 host=localhost root=default >/dev/null 2>&1 || true
ceph-osd -i 0
for _ in $(seq 1 60); do ceph osd stat 2>/dev/null | grep -q '1 up' && break; sleep 0.5; done
ceph auth get-or-create client.rgw mon 'allow rw' osd 'allow rwx' > "$DIR/client.rgw.keyring"
radosgw -n client.rgw
for _ in $(seq 1 120); do curl -s -o /dev/null "http://127.0.0.1:$RGW_PORT/" && break; sleep 0.5; done
radosgw-admin user create --uid=testing --display-name=testing \
  --access-key=testing --secret=testing >/dev/null
# RGW creates its bucket-index and data pools on the first bucket and the first object (~2 s
# each, and the new placement groups keep peering for a while): do it here, once, so tests and
# benchmarks meet a settled cluster.
s3() { curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 aws:amz:us-east-1:s3 \
  --user testing:testing -H x-amz-content-sha256:UNSIGNED-PAYLOAD "$@"; }
code=$(s3 -X PUT "http://127.0.0.1:$RGW_PORT/rgw-warmup")
[ "$code" = 200 ] || { echo "warm-up bucket: HTTP $code" >&2; exit 1; }
code=$(echo warm | s3 -X PUT --data-binary @- "http://127.0.0.1:$RGW_PORT/rgw-warmup/object")
[ "$code" = 200 ] || { echo "warm-up object: HTTP $code" >&2; exit 1; }
echo "radosgw on http://127.0.0.1:$RGW_PORT"
