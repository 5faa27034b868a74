//! LVM2 parsing on the fuzz target's seeds (a PV made to the on-disk format, and its metadata
//! text) and on every crafted input found by fuzzing (`fixtures/hostile/lvm-*`). The full path,
//! a PV made by pvcreate/vgcreate/vgcfgrestore holding file systems, runs end to end in
//! tests/tests/browse.rs.

use std::collections::BTreeMap;
use std::path::Path;

use mount::lvm::{check, parse_metadata, read_pv, LvMap};

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_seed_pv_reads_as_its_volume_group() {
    let pv = std::fs::read(root().join("fuzz/seeds/lvm/pv.bin")).unwrap();
    let label = read_pv(&&pv[..], pv.len() as u64)
        .unwrap()
        .expect("a PV label");
    assert_eq!(label.uuid, "AAAAAABBBBCCCCDDDDEEEEFFFFGGGGGG");
    let vg = parse_metadata(&label.metadata.unwrap()).unwrap();
    assert_eq!(vg.name, "vg0");
    let starts = BTreeMap::from([(label.uuid.clone(), (1u64 << 30, 100u64 << 22))]);
    let root_lv = vg.lvs.iter().find(|l| l.name == "root").unwrap();
    let map = LvMap::new(&vg, root_lv, &starts).unwrap();
    let ext = 4u64 << 20;
    assert_eq!(map.size(), 14 * ext);
    // Linear part: PV extent 20, after pe_start (1 MiB), after the PV's own start.
    assert_eq!(
        map.pieces(100, 10).unwrap(),
        [((1 << 30) + (1 << 20) + 20 * ext + 100, 10)]
    );
    // Striped part: 64 KiB alternating between PV extents 50 and 70.
    let base = (1u64 << 30) + (1 << 20);
    assert_eq!(
        map.pieces(10 * ext + 65536 - 4, 8).unwrap(),
        [(base + 50 * ext + 65532, 4), (base + 70 * ext, 4)]
    );
    assert!(map.pieces(14 * ext - 1, 2).is_err(), "past the end");
    let pool = vg.lvs.iter().find(|l| l.name == "pool").unwrap();
    assert!(LvMap::new(&vg, pool, &starts)
        .unwrap_err()
        .contains("thin-pool"));
    let elsewhere = BTreeMap::new();
    assert!(LvMap::new(&vg, root_lv, &elsewhere)
        .unwrap_err()
        .contains("not on this disk"));
}

#[test]
fn fuzz_seeds_and_crafted_inputs_check_without_panic() {
    let mut n = 0;
    for (dir, prefix) in [("fuzz/seeds/lvm", ""), ("fixtures/hostile", "lvm-")] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_str().unwrap().starts_with(prefix) {
                check(&std::fs::read(&p).unwrap());
                n += 1;
            }
        }
    }
    assert!(n >= 2, "{n} inputs");
}
