//! Fuzzes the layer unpacker with arbitrary bytes and checks its one promise that matters most:
//! whatever a layer holds, nothing outside the layer root is created, changed or removed.
//!
//! Input: the first byte picks how the rest is fed in:
//! - `0 mod 3`: as an uncompressed tar layer (diff_id computed, so a valid tar unpacks fully);
//! - `1 mod 3`: gzip-compressed here first, then fed as a tar+gzip layer (mutations act on the tar);
//! - `2 mod 3`: as a tar+gzip blob as it is (mutations act on the gzip stream).
//!
//! Each run unpacks into `<work>/root` beside `<work>/outside`, a tree of canaries (files, a
//! directory, symlinks to them) that hostile entries could aim at with `..`, symlinks or
//! hardlinks; the whole work dir except `root` is compared before and after.

#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use deliverous_images::unpack::{unpack_into_with, Compression};
use deliverous_images::UnpackOptions;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// Small enough that a bomb or a huge sparse file fails fast, large enough for real tars.
const LIMIT: u64 = 16 << 20;

/// The work dir, one per fuzzing process, removed and made anew for each input.
fn work() -> &'static Path {
    static WORK: OnceLock<PathBuf> = OnceLock::new();
    WORK.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("deliverous-fuzz-unpack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).expect("creating the fuzz work dir");
        base
    })
}

/// Everything under `dir` except `skip`: path → (type and mode, owner, size, content or link).
fn snapshot(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(p: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, String>) {
        if p == skip {
            return;
        }
        let Ok(m) = fs::symlink_metadata(p) else { return };
        let detail = if m.file_type().is_symlink() {
            format!("-> {:?}", fs::read_link(p).ok())
        } else if m.is_file() {
            format!("{:?}", fs::read(p).ok())
        } else {
            String::new()
        };
        out.insert(p.to_path_buf(), format!("{:o} {}:{} {} {}", m.mode(), m.uid(), m.gid(), m.len(), detail));
        if m.is_dir() {
            let mut children: Vec<_> = fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()).collect();
            children.sort();
            for c in children {
                walk(&c, skip, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, skip, &mut out);
    out
}

fn prepare(work: &Path) -> PathBuf {
    let _ = fs::remove_dir_all(work);
    let outside = work.join("outside");
    fs::create_dir_all(outside.join("dir")).expect("outside dir");
    fs::write(outside.join("canary"), b"canary").expect("canary");
    fs::write(outside.join("dir/inner"), b"inner").expect("inner");
    std::os::unix::fs::symlink("canary", outside.join("link")).expect("link");
    std::os::unix::fs::symlink(&outside, work.join("to-outside")).expect("to-outside");
    let root = work.join("root");
    fs::create_dir(&root).expect("root");
    root
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(tar)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let (blob, compression, diff_id) = match mode % 3 {
        0 => (body.to_vec(), Compression::None, diff_id(body)),
        1 => (gzip(body), Compression::Gzip, diff_id(body)),
        _ => {
            let mut tar = Vec::new();
            let _ = flate2::read::MultiGzDecoder::new(body).take(LIMIT).read_to_end(&mut tar);
            (body.to_vec(), Compression::Gzip, diff_id(&tar))
        }
    };
    let work = work();
    let root = prepare(work);
    let blob_path = work.join("blob");
    fs::write(&blob_path, &blob).expect("writing the blob");
    let before = snapshot(work, &root);

    let result =
        unpack_into_with(&blob_path, compression, &diff_id, &root, &UnpackOptions { max_unpacked_bytes: LIMIT });

    let after = snapshot(work, &root);
    if before != after {
        let changed: Vec<_> = after.iter().filter(|(p, v)| before.get(*p) != Some(v)).map(|(p, _)| p).collect();
        let removed: Vec<_> = before.keys().filter(|p| !after.contains_key(*p)).collect();
        panic!("unpacking wrote outside the layer root: changed or created {changed:?}, removed {removed:?}; result {result:?}");
    }
    // The root itself must still be a real directory (not swapped for a symlink).
    let m = fs::symlink_metadata(&root).expect("root");
    assert!(m.is_dir(), "the layer root is no longer a directory");
});
