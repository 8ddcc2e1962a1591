//! The fuzz target's seed corpus (`fuzz/corpus/unpack/*.bin`), run through the same check in the
//! normal test suite, so the hostile seeds guard every build, not only fuzzing sessions: nothing
//! outside the layer root may change, valid seeds unpack, hostile ones never escape.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use deliverous_images::unpack::{unpack_into_with, Compression};
use deliverous_images::UnpackOptions;
use sha2::{Digest, Sha256};

fn snapshot(p: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, String>) {
    if p == skip {
        return;
    }
    let m = fs::symlink_metadata(p).unwrap();
    let detail = if m.file_type().is_symlink() {
        format!("-> {:?}", fs::read_link(p).unwrap())
    } else if m.is_file() {
        format!("{:?}", fs::read(p).unwrap())
    } else {
        String::new()
    };
    out.insert(p.to_path_buf(), format!("{:o} {}:{} {} {detail}", m.mode(), m.uid(), m.gid(), m.len()));
    if m.is_dir() {
        let mut children: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
        children.sort();
        for c in children {
            snapshot(&c, skip, out);
        }
    }
}

#[test]
fn seed_corpus_stays_inside_the_root() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/unpack");
    let mut seeds: Vec<PathBuf> = fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "expected the committed seeds in {}", corpus.display());
    let limit = 16 << 20;
    for seed in seeds {
        let name = seed.file_stem().unwrap().to_string_lossy().into_owned();
        let data = fs::read(&seed).unwrap();
        let (mode, body) = data.split_first().unwrap();
        // Modes as in fuzz_targets/unpack.rs: 0 plain tar, 1 tar to gzip here, 2 gzip as it is.
        let tar = if mode % 3 == 2 {
            let mut tar = Vec::new();
            let _ = flate2::read::MultiGzDecoder::new(body).take(limit).read_to_end(&mut tar);
            tar
        } else {
            body.to_vec()
        };
        let blob = if mode % 3 == 1 {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, body).unwrap();
            gz.finish().unwrap()
        } else {
            body.to_vec()
        };
        let compression = if mode % 3 == 0 { Compression::None } else { Compression::Gzip };
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));

        let work = tempfile::tempdir().unwrap();
        let outside = work.path().join("outside");
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(outside.join("canary"), b"canary").unwrap();
        fs::write(outside.join("dir/inner"), b"inner").unwrap();
        std::os::unix::fs::symlink("canary", outside.join("link")).unwrap();
        let root = work.path().join("root");
        fs::create_dir(&root).unwrap();
        let blob_path = work.path().join("blob");
        fs::write(&blob_path, &blob).unwrap();
        let mut before = BTreeMap::new();
        snapshot(work.path(), &root, &mut before);

        let result =
            unpack_into_with(&blob_path, compression, &diff_id, &root, &UnpackOptions { max_unpacked_bytes: limit });

        let mut after = BTreeMap::new();
        snapshot(work.path(), &root, &mut after);
        assert_eq!(before, after, "seed {name}: something outside the layer root changed ({result:?})");
        assert!(fs::symlink_metadata(&root).unwrap().is_dir(), "seed {name}: the root is no longer a directory");
        if name.starts_with("valid-") {
            assert!(result.is_ok(), "seed {name}: {result:?}");
        }
    }
}
