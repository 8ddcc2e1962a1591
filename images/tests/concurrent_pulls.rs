//! Pulls that meet: two at once in one process (one store) and in two "processes" (two stores on
//! one data dir) fetch each shared blob once; layers download in parallel and unpack while they
//! stream; a corrupt blob leaves nothing behind.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{compressible, layer, leftovers, noise, push, Pushed, Registry};
use deliverous_images::{CredentialFiles, Error, ImageStore, PullOptions, Reference};

/// A store that keeps compressed blobs, so these tests can check them and re-unpack from them.
fn open(dir: &std::path::Path) -> ImageStore {
    ImageStore::open(dir).unwrap().with_credentials(CredentialFiles::none()).with_keep_blobs(true)
}

/// Two images sharing a large base layer, each with its own top layer.
fn two_images(registry: &Registry) -> (Pushed, Pushed) {
    let base = layer(&[
        ("usr/lib/base.bin".into(), noise(1, 6 << 20)),
        ("usr/share/doc.txt".into(), compressible(2, 2 << 20)),
    ]);
    let a = push(registry, "demo/a:1", &[base.clone(), layer(&[("app/a".into(), noise(3, 1 << 20))])], None);
    let b = push(registry, "demo/b:1", &[base, layer(&[("app/b".into(), noise(4, 1 << 20))])], None);
    assert_eq!(a.layer_digests[0], b.layer_digests[0], "the base layer must be shared");
    (a, b)
}

fn delta(before: &HashMap<String, usize>, after: &HashMap<String, usize>) -> HashMap<String, usize> {
    after.iter().map(|(d, n)| (d.clone(), n - before.get(d).copied().unwrap_or(0))).filter(|(_, n)| *n > 0).collect()
}

fn assert_each_fetched_once(fetched: &HashMap<String, usize>, a: &Pushed, b: &Pushed) {
    let mut wanted: Vec<&String> = a.layer_digests.iter().chain(&b.layer_digests).collect();
    wanted.extend([&a.config_digest, &b.config_digest]);
    wanted.sort();
    wanted.dedup();
    for digest in wanted {
        assert_eq!(
            fetched.get(digest).copied(),
            Some(1),
            "blob {digest} fetched {:?} times: {fetched:?}",
            fetched.get(digest)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pulls_fetch_shared_blobs_once() {
    let registry = Registry::start(None);
    let (a, b) = two_images(&registry);
    let (ra, rb) = (Reference::parse(&a.reference).unwrap(), Reference::parse(&b.reference).unwrap());
    let opts = PullOptions::default();

    // One process, one store.
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(open(data.path()));
    let before = registry.blob_gets();
    let (s1, s2) = (store.clone(), store.clone());
    let (o1, o2) = (opts.clone(), opts.clone());
    let (ia, ib) = tokio::join!(
        tokio::spawn(async move { s1.pull(&ra, &o1).await }),
        tokio::spawn(async move { s2.pull(&rb, &o2).await })
    );
    let (ia, ib) = (ia.unwrap().unwrap(), ib.unwrap().unwrap());
    assert_each_fetched_once(&delta(&before, &registry.blob_gets()), &a, &b);
    assert_eq!(ia.layers[0], ib.layers[0]);
    for dir in store.layer_dirs(&ia).into_iter().chain(store.layer_dirs(&ib)) {
        assert!(dir.is_dir(), "{}", dir.display());
    }
    assert!(leftovers(data.path()).is_empty(), "{:?}", leftovers(data.path()));

    // Two stores on one data dir, as two daemons (or a daemon and a CLI) would be: only the
    // file lock keeps them from fetching the base layer twice.
    let data = tempfile::tempdir().unwrap();
    let (s1, s2) = (Arc::new(open(data.path())), Arc::new(open(data.path())));
    let (ra, rb) = (Reference::parse(&a.reference).unwrap(), Reference::parse(&b.reference).unwrap());
    let before = registry.blob_gets();
    let (o1, o2) = (opts.clone(), opts.clone());
    let (t1, t2) = (s1.clone(), s2.clone());
    let (ia, ib) = tokio::join!(
        tokio::spawn(async move { t1.pull(&ra, &o1).await }),
        tokio::spawn(async move { t2.pull(&rb, &o2).await })
    );
    let (ia, ib) = (ia.unwrap().unwrap(), ib.unwrap().unwrap());
    assert_each_fetched_once(&delta(&before, &registry.blob_gets()), &a, &b);
    let base = &s1.layer_dirs(&ia)[0];
    assert_eq!(std::fs::read(base.join("usr/lib/base.bin")).unwrap(), noise(1, 6 << 20));
    assert!(s2.layer_dirs(&ib).iter().all(|d| d.is_dir()));
    assert!(leftovers(data.path()).is_empty(), "{:?}", leftovers(data.path()));

    // Pulling again fetches no layer; a layer whose directory went away comes back from its
    // blob, without a download.
    let before = registry.blob_gets();
    std::fs::remove_dir_all(base).unwrap();
    let again = s1.pull(&Reference::parse(&a.reference).unwrap(), &opts).await.unwrap();
    assert!(s1.layer_dirs(&again)[0].join("usr/lib/base.bin").is_file());
    let fetched = delta(&before, &registry.blob_gets());
    assert!(a.layer_digests.iter().all(|d| !fetched.contains_key(d)), "{fetched:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_layers_stream_in_parallel_with_exact_contents() {
    let registry = Registry::start(None);
    let layers: Vec<Vec<u8>> = (0..7u64)
        .map(|i| {
            layer(&[
                (format!("d{i}/f.bin"), noise(100 + i, 500_000 + i as usize * 1000)),
                (format!("d{i}/t"), compressible(i, 70_000)),
            ])
        })
        .collect();
    let pushed = push(&registry, "demo/many:1", &layers, None);
    let data = tempfile::tempdir().unwrap();
    let store = open(data.path());
    let image = store.pull(&Reference::parse(&pushed.reference).unwrap(), &PullOptions::default()).await.unwrap();
    let dirs = store.layer_dirs(&image);
    assert_eq!(dirs.len(), 7);
    for (i, dir) in dirs.iter().enumerate() {
        let i = i as u64;
        assert_eq!(
            std::fs::read(dir.join(format!("d{i}/f.bin"))).unwrap(),
            noise(100 + i, 500_000 + i as usize * 1000)
        );
        assert_eq!(std::fs::read(dir.join(format!("d{i}/t"))).unwrap(), compressible(i, 70_000));
    }
    for digest in &pushed.layer_digests {
        let blob = std::fs::read(store.blob_path(digest).unwrap()).unwrap();
        assert_eq!(format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&blob))), *digest);
    }
    assert!(leftovers(data.path()).is_empty(), "{:?}", leftovers(data.path()));

    // By default only the unpacked layers are kept: no second copy of each layer as a blob.
    let lean_dir = tempfile::tempdir().unwrap();
    let lean = ImageStore::open(lean_dir.path()).unwrap().with_credentials(CredentialFiles::none());
    let image = lean.pull(&Reference::parse(&pushed.reference).unwrap(), &PullOptions::default()).await.unwrap();
    assert!(lean.layer_dirs(&image).iter().all(|d| d.is_dir()));
    for digest in &pushed.layer_digests {
        assert!(!lean.blob_path(digest).unwrap().exists(), "blob {digest} kept");
    }
    assert!(leftovers(lean_dir.path()).is_empty(), "{:?}", leftovers(lean_dir.path()));
}

#[tokio::test]
async fn corrupt_blob_keeps_neither_blob_nor_layer() {
    let registry = Registry::start(None);
    let good = layer(&[("ok".into(), noise(9, 200_000))]);
    let victim = layer(&[("bad".into(), noise(10, 400_000))]);
    let pushed = push(&registry, "demo/corrupt:1", &[good, victim.clone()], None);
    // Flip bytes in the registry's copy of the second layer: same length, other content.
    let hex = &pushed.layer_digests[1][7..];
    let data_file = registry_blob_path(&registry, hex);
    let mut bytes = std::fs::read(&data_file).unwrap();
    assert_eq!(bytes, victim);
    let mid = bytes.len() / 2;
    bytes[mid..mid + 16].iter_mut().for_each(|b| *b ^= 0xff);
    std::fs::write(&data_file, &bytes).unwrap();

    let data = tempfile::tempdir().unwrap();
    let store = open(data.path());
    let reference = Reference::parse(&pushed.reference).unwrap();
    let err = store.pull(&reference, &PullOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. } | Error::Unpack { .. }), "{err}");
    assert!(!store.blob_path(&pushed.layer_digests[1]).unwrap().exists(), "corrupt blob kept");
    let layer_dirs: Vec<_> =
        std::fs::read_dir(data.path().join("layers")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(layer_dirs.len() <= 1, "only the good layer may be kept: {layer_dirs:?}");
    assert!(leftovers(data.path()).is_empty(), "{:?}", leftovers(data.path()));
    assert!(store.get(&reference).unwrap().is_none());
}

/// Where docker-registry's filesystem driver keeps blob `hex`.
fn registry_blob_path(registry: &Registry, hex: &str) -> std::path::PathBuf {
    registry.storage().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
}
