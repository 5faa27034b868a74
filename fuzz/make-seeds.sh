#!/usr/bin/env bash
# Seeds for the fuzz targets, from real mkfs images (checked in under seeds/, each < 100 KiB):
#   fuzz/make-seeds.sh [out-dir]     (default: fuzz/seeds)
# Needs mkfs.ext2/3/4, e2fsck (e2fsprogs), mkfs.xfs (xfsprogs), mkfs.vfat (dosfstools),
# mcopy (mtools), mkntfs and ntfscp (ntfs-3g), mkfs.btrfs and btrfs (btrfs-progs; the
# compressed btrfs seed needs root for its loop mount) and python3. XFS, FAT, NTFS and btrfs
# seeds are sparse-sector records (see mount::filesystem::SparseImage), < 256 KiB each.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/seeds}
mkdir -p "$out/ext4" "$out/partitions" "$out/nbd_server" "$out/xfs" "$out/lvm" "$out/fat" "$out/ntfs" "$out/btrfs"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# records IMG OUT [skip-ff]: IMG as sparse-sector records (mount::filesystem::SparseImage):
# each non-zero 512-byte sector as its LE u32 number and its bytes (skip-ff: sectors of 0xff
# bytes left out too).
records() {
    python3 - "$1" "$2" "${3:-}" <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
with open(sys.argv[2], "wb") as o:
    for i in range(0, len(d), 512):
        s = d[i:i + 512]
        if any(s) and not (sys.argv[3] == "skip-ff" and s == b"\xff" * 512):
            o.write(struct.pack("<I", i // 512) + s)
PY
}

# A tree with the cases the reader handles: inline-sized and block files, a hole, symlinks
# short and long, a nested directory, a fifo.
tree=$tmp/tree
mkdir -p "$tree/dir/sub"
printf 'hello\n' > "$tree/small.txt"
head -c 3000 /dev/zero | tr '\0' 'x' > "$tree/dir/mid.txt"
printf 'tail' | dd of="$tree/sparse.bin" bs=1 seek=20000 status=none
ln -s small.txt "$tree/short.lnk"
ln -s "dir/$(printf 'y%.0s' $(seq 80))/../../small.txt" "$tree/long.lnk"
mkfifo "$tree/fifo"
: > "$tree/dir/sub/empty"

mk() { # name kib mkfs-command args...
    local name=$1 kib=$2; shift 2
    truncate -s "${kib}K" "$tmp/$name.img"
    "$@" -q -F -E root_owner=0:0 -d "$tree" "$tmp/$name.img" >/dev/null
    cp "$tmp/$name.img" "$out/ext4/$name.img"
}
mk ext4-1k 64 mkfs.ext4 -b 1024 -N 32 -O ^has_journal,^resize_inode
mk inline 64 mkfs.ext4 -b 1024 -N 32 -O ^has_journal,^resize_inode,inline_data
mk metabg-64bit 64 mkfs.ext4 -b 1024 -N 32 -O ^has_journal,^resize_inode,meta_bg,64bit
mk ext2 64 mkfs.ext2 -b 1024 -N 32
# ext3 needs a journal of 1024 blocks: a 1.1 MiB image, generated only when asked for.
if [ "${SEEDS_LARGE:-}" = 1 ]; then
    mk ext3 1100 mkfs.ext3 -b 1024 -N 32
fi
# A hashed-tree directory: mkfs -d links entries linearly, e2fsck -D indexes them.
for i in $(seq 1 150); do : > "$tree/dir/file-with-a-longer-name-$i"; done
truncate -s 96K "$tmp/htree.img"
mkfs.ext4 -q -F -b 1024 -N 192 -I 128 -O ^has_journal,^resize_inode -d "$tree" "$tmp/htree.img" >/dev/null
e2fsck -fyD "$tmp/htree.img" >/dev/null 2>&1 || [ $? -le 1 ]
cp "$tmp/htree.img" "$out/ext4/htree.img"

# XFS (mkfs.xfs makes nothing under 300 MB, so the seeds carry only the non-zero sectors),
# filled from a prototype file: v4 without file types, v5 with 4 KiB and 1 KiB blocks.
{
    echo boot; echo 0 0; echo "d--755 0 0"
    echo "small.txt ---644 0 0 $tree/small.txt"
    echo "sparse.bin ---644 0 0 $tree/sparse.bin"
    echo "short.lnk l--777 0 0 small.txt"
    echo "long.lnk l--777 0 0 $(printf 'y/%.0s' $(seq 300))end"
    echo "fifo p--640 0 0"
    echo "dir d--755 0 0"
    echo "mid.txt ---644 0 0 $tree/dir/mid.txt"
    for i in $(seq 1 40); do echo "file-with-a-longer-name-$i ---644 0 0 $tree/small.txt"; done
    echo "sub d--1777 0 0"; echo '$'
    echo '$'; echo '$'
} > "$tmp/proto"
mkxfs() { # name mkfs.xfs-args...
    local name=$1; shift
    truncate -s 300M "$tmp/$name.img"
    mkfs.xfs -q -f -d agcount=2 "$@" -p "$tmp/proto" "$tmp/$name.img" 2>/dev/null
    records "$tmp/$name.img" "$out/xfs/$name.bin"
    rm "$tmp/$name.img"
}
mkxfs v4 -m crc=0 -n ftype=0
mkxfs v5
mkxfs v5-1k -b size=1024 -n size=8192

# FAT12, FAT16 and FAT32 (mkfs.vfat, filled by mtools: long, short and lower-case names, a
# nested directory), as sparse-sector records like the XFS seeds.
mkfat() { # name bits kib
    rm -f "$tmp/$1.img"
    mkfs.vfat -C -F "$2" -n SEED "$tmp/$1.img" "$3" >/dev/null
    MTOOLS_SKIP_CHECK=1 mcopy -s -m -i "$tmp/$1.img" "$tree/small.txt" "$tree/dir" ::/
    printf 'long name\n' > "$tmp/A long file name.txt"
    MTOOLS_SKIP_CHECK=1 mcopy -m -i "$tmp/$1.img" "$tmp/A long file name.txt" ::/
    records "$tmp/$1.img" "$out/fat/$1.bin"
    rm "$tmp/$1.img"
}
mkfat fat12 12 1024
mkfat fat16 16 16384
mkfat fat32 32 34000

# NTFS (mkntfs, files added with ntfscp: resident and non-resident data, a sparse file), as
# sparse-sector records.
truncate -s 8M "$tmp/ntfs.img"
mkntfs -F -Q -q -L SEED "$tmp/ntfs.img" >/dev/null 2>&1
for f in small.txt dir/mid.txt sparse.bin; do
    ntfscp -q "$tmp/ntfs.img" "$tree/$f" "$(basename "$f")"
done
# mkntfs fills $LogFile with 0xff bytes: those sectors are left out (the reader never reads
# the log), which keeps the seed small.
records "$tmp/ntfs.img" "$out/ntfs/small.bin" skip-ff

# btrfs (mkfs.btrfs --rootdir; and, as root, a loop mount adding files compressed with zlib,
# LZO and zstd, a subvolume and a snapshot), as sparse-sector records.
truncate -s 128M "$tmp/btrfs.img"
mkfs.btrfs -q -n 4096 -m single --rootdir "$tree" "$tmp/btrfs.img"
records "$tmp/btrfs.img" "$out/btrfs/rootdir.bin"
if [ "$(id -u)" = 0 ]; then
    mkdir "$tmp/mnt"
    mount -o loop "$tmp/btrfs.img" "$tmp/mnt"
    for alg in zlib lzo zstd; do
        mkdir "$tmp/mnt/$alg"
        btrfs property set "$tmp/mnt/$alg" compression "$alg"
        head -c 1500 /dev/zero | tr '\0' 'a' > "$tmp/mnt/$alg/inline.txt"
        head -c 9000 /dev/zero | tr '\0' 'b' > "$tmp/mnt/$alg/regular.txt"
    done
    btrfs -q subvolume create "$tmp/mnt/sub"
    cp "$tree/small.txt" "$tmp/mnt/sub/"
    btrfs -q subvolume snapshot "$tmp/mnt/sub" "$tmp/mnt/dir/snap"
    setfattr -n user.note -v seed "$tmp/mnt/small.txt" 2>/dev/null || true
    umount "$tmp/mnt"
    records "$tmp/btrfs.img" "$out/btrfs/compressed.bin"
fi

# LVM2: a PV with a 64 KiB metadata area (label in sector 1, text after the area's header),
# and the same text alone, with linear, striped and thin LVs.
python3 - "$out/lvm" <<'PY'
import struct, sys
out = sys.argv[1]
text = b"""vg0 {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-gggggg"
seqno = 2
format = "lvm2"
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192
physical_volumes {
pv0 {
id = "AAAAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG"
device = "/dev/loop0"
pe_start = 2048
pe_count = 100
}
}
logical_volumes {
root {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 10
type = "striped"
stripe_count = 1
stripes = ["pv0", 20]
}
segment2 {
start_extent = 10
extent_count = 4
type = "striped"
stripe_count = 2
stripe_size = 128
stripes = ["pv0", 50, "pv0", 70]
}
}
pool {
status = ["READ", "WRITE", "VISIBLE"]
segment1 {
start_extent = 0
extent_count = 1
type = "thin-pool"
}
}
}
}
contents = "Text Format Volume Group"
version = 1
"""
mda_at, mda_len = 4096, 64 * 1024
d = bytearray(mda_at + mda_len)
label = b"LABELONE" + struct.pack("<QII", 1, 0, 32) + b"LVM2 001"
pvh = b"AAAAAABBBBCCCCDDDDEEEEFFFFGGGGGG" + struct.pack("<Q", 100 << 22)
pvh += struct.pack("<QQ", 1 << 20, 0) + bytes(16)  # data area, end of list
pvh += struct.pack("<QQ", mda_at, mda_len) + bytes(16)  # metadata area, end of list
d[512:512 + len(label + pvh)] = label + pvh
hdr = struct.pack("<I", 0) + b" LVM2 x[5A%r0N*>" + struct.pack("<IQQ", 1, mda_at, mda_len)
hdr += struct.pack("<QQII", 512, len(text), 0, 0) + bytes(24)
d[mda_at:mda_at + len(hdr)] = hdr
d[mda_at + 512:mda_at + 512 + len(text)] = text
open(f"{out}/pv.bin", "wb").write(d)
open(f"{out}/metadata.txt", "wb").write(text)
PY

python3 - "$out/partitions" <<'PY'
import struct, sys, zlib
out = sys.argv[1]
def mbr(parts, protective=False):
    d = bytearray(64 * 1024)
    for i, (kind, start, n) in enumerate(parts):
        struct.pack_into("<B3xII", d, 446 + 16 * i + 4, kind, start, n)
    if protective:
        struct.pack_into("<B3xII", d, 446 + 4, 0xEE, 1, len(d) // 512 - 1)
    d[510:512] = b"\x55\xaa"
    return d
open(f"{out}/mbr.img", "wb").write(mbr([(0x83, 8, 40), (0x82, 48, 40), (0x05, 90, 10)]))
d = mbr([], protective=True)
sectors, count = len(d) // 512, 64
table = (count * 128 + 511) // 512
entries = bytearray(count * 128)
for i, (first, last) in enumerate([(20, 59), (60, 100)]):
    struct.pack_into("<16s16sQQQ", entries, i * 128, b"\xaf" * 16, bytes([i]) * 16, first, last, 0)
for my, other, at in [(1, sectors - 1, 2), (sectors - 1, 1, sectors - 1 - table)]:
    d[at * 512:at * 512 + len(entries)] = entries
    h = bytearray(92)
    struct.pack_into("<8sIII4xQQQQ16sQIII", h, 0, b"EFI PART", 0x10000, 92, 0, my, other,
                     2 + table, sectors - table - 2, b"\x11" * 16, at, count, 128,
                     zlib.crc32(entries))
    struct.pack_into("<I", h, 16, zlib.crc32(h))
    d[my * 512:my * 512 + 92] = h
open(f"{out}/gpt.img", "wb").write(d)
PY

# Client sessions for the NBD server target: option haggling, then requests of every kind.
python3 - "$out/nbd_server" <<'PY'
import struct, sys
out = sys.argv[1]
def opt(o, data=b""):
    return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data
def name(n):
    return struct.pack(">I", len(n)) + n
def go(n, infos=(0, 3)):
    return opt(7, name(n) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))
def meta(o, n, queries):
    return opt(o, name(n) + struct.pack(">I", len(queries)) + b"".join(name(q) for q in queries))
def req(kind, off, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, off, length) + payload
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
hello = struct.pack(">I", 3)  # fixed newstyle, no zeroes
haggle = opt(3) + opt(6, name(b"ro") + struct.pack(">H", 0)) + opt(8) + \
    meta(9, b"ro", [b"base:"]) + meta(10, b"ro", [b"base:allocation"])
ro = hello + haggle + go(b"ro") + b"".join([
    req(READ, 0, 4096), req(READ, (1 << 20) - 100, 4096, cookie=2), req(BS, 0, 4 << 20, cookie=3),
    req(BS, 1 << 20, 8192, flags=8, cookie=4), req(CACHE, 0, 1 << 20, cookie=5),
    req(FLUSH, 0, 0, cookie=6), req(READ, 4 << 20, 300, flags=4, cookie=7), req(DISC, 0, 0)])
rw = hello + opt(8) + go(b"rw") + b"".join([
    req(WRITE, 512, 8, payload=b"elastio!"), req(READ, 0, 1024, cookie=2),
    req(TRIM, 0, 65536, cookie=3), req(WZ, 65536, 65536, flags=2, cookie=4),
    req(BS, 0, 1 << 20, cookie=5), req(WRITE, (4 << 20) + 296, 4, payload=b"tail", cookie=6),
    req(FLUSH, 0, 0, cookie=7), req(DISC, 0, 0)])
old = hello + opt(1, b"disk") + req(READ, 0, 512) + req(DISC, 0, 0)
bad = hello + opt(5) + opt(7, b"\xff" * 6) + opt(2)
for n, d in [("ro", ro), ("rw", rw), ("export-name", old), ("bad-options", bad)]:
    open(f"{out}/{n}.bin", "wb").write(d)
PY
# nbd_client: what a server sends a client that asks for two meta contexts, reads and asks
# for block status: the greeting, option replies, then structured reply chunks.
mkdir -p "$out/nbd_client"
python3 - "$out/nbd_client" <<'PY'
import struct, sys
out = sys.argv[1]
def rep(opt, kind, data=b""):
    return struct.pack(">QIII", 0x3e889045565a9, opt, kind, len(data)) + data
def chunk(flags, kind, cookie, payload):
    return struct.pack(">IHHQI", 0x668e33ef, flags, kind, cookie, len(payload)) + payload
size = 1 << 20
s = b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)
s += rep(8, 1)
s += rep(10, 4, struct.pack(">I", 1) + b"base:allocation")
s += rep(10, 4, struct.pack(">I", 2) + b"qemu:dirty-bitmap:b0") + rep(10, 1)
s += rep(7, 3, struct.pack(">HQH", 0, size, 1 | 2 | 8))
s += rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 1 << 25)) + rep(7, 1)
s += chunk(0, 1, 1, struct.pack(">Q", 0) + b"\x5a" * 4096)
s += chunk(1, 2, 1, struct.pack(">QI", 4096, 65536 - 4096))
s += chunk(1, 5, 2, struct.pack(">I", 1) + struct.pack(">II", 65536, 0) + struct.pack(">II", size - 65536, 3))
s += chunk(1, 5, 3, struct.pack(">I", 2) + struct.pack(">II", 131072, 1) + struct.pack(">II", size - 131072, 0))
open(f"{out}/session.bin", "wb").write(s)
err = s[:s.index(b"\x66\x8e\x33\xef")] + chunk(1, 32769, 1, struct.pack(">IH", 5, 4) + b"oops")
open(f"{out}/read-error.bin", "wb").write(err)
PY
ls -l "$out"/*
