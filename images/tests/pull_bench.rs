//! Pull throughput on a local registry with a ~90 MB image of six layers (incompressible and
//! text-like files of mixed sizes). Ignored by default: run in release,
//!
//! `cargo test --release -p deliverous-images --test pull_bench -- --ignored --nocapture`
//!
//! `pull_benchmark` starts its own registry and prints the median of several pulls into fresh
//! data dirs. `push_bench_image` only pushes the image to the registry named by
//! `DELIVEROUS_BENCH_REGISTRY` (`127.0.0.1:PORT`), so another build can be timed against it.

mod common;

use std::time::{Duration, Instant};

use common::{compressible, layer, noise, push, push_to, Registry};
use deliverous_images::{CredentialFiles, ImageStore, PullOptions, Reference};

const REPO_TAG: &str = "bench/big:1";

/// Six layers, 88 MiB unpacked, about 60 MiB compressed.
fn bench_layers() -> Vec<Vec<u8>> {
    let sizes_mib = [24u64, 20, 16, 12, 8, 8];
    sizes_mib
        .iter()
        .enumerate()
        .map(|(l, mib)| {
            let mut files = Vec::new();
            let mut left = mib << 20;
            let mut i = 0u64;
            while left > 0 {
                // 16 KiB .. 2 MiB, every other file text-like.
                let size = (16u64 << 10) << (i % 8);
                let size = size.min(left);
                let seed = (l as u64) << 32 | i;
                let data = if i % 2 == 0 { noise(seed, size as usize) } else { compressible(seed, size as usize) };
                files.push((format!("l{l}/d{}/f{i}", i % 7), data));
                left -= size;
                i += 1;
            }
            layer(&files)
        })
        .collect()
}

#[test]
#[ignore = "pushes the benchmark image to DELIVEROUS_BENCH_REGISTRY"]
fn push_bench_image() {
    let addr = std::env::var("DELIVEROUS_BENCH_REGISTRY").expect("set DELIVEROUS_BENCH_REGISTRY=127.0.0.1:PORT");
    let pushed = push_to(&addr, REPO_TAG, &bench_layers(), None);
    println!("pushed {}", pushed.reference);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
async fn pull_benchmark() {
    let registry = Registry::start(None);
    let pushed = push(&registry, REPO_TAG, &bench_layers(), None);
    let reference = Reference::parse(&pushed.reference).unwrap();
    let mut times = Vec::new();
    for _ in 0..5 {
        let data = tempfile::tempdir().unwrap();
        let store = ImageStore::open(data.path()).unwrap().with_credentials(CredentialFiles::none());
        let start = Instant::now();
        store.pull(&reference, &PullOptions::default()).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |d: &Duration| d.as_millis();
    println!(
        "pull of {}: median {} ms (runs {:?} ms)",
        pushed.reference,
        ms(&times[2]),
        times.iter().map(ms).collect::<Vec<_>>()
    );
}
