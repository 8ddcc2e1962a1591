//! Compiles the per-instance monitor (`monitor/main.rs`, std only) into `OUT_DIR` with the
//! same compiler, for the same target, small (`opt-level=s`, `panic=abort`, stripped); the
//! runtime embeds it (`shim::monitor`) so the operator still installs one binary.

use std::path::PathBuf;
use std::process::Command;

use sha2::{Digest, Sha256};

fn main() {
    println!("cargo:rerun-if-changed=monitor");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let var = |k: &str| std::env::var_os(k).unwrap_or_else(|| fail(&format!("cargo did not set {k}")));
    let out = PathBuf::from(var("OUT_DIR"));
    let bin = out.join("dlv-monitor");
    let mut rustc = Command::new(var("RUSTC"));
    rustc
        .args(["--edition=2021", "--crate-type=bin", "--crate-name=dlv_monitor"])
        .args(["-Copt-level=s", "-Cpanic=abort", "-Ccodegen-units=1", "-Clto=fat", "-Cstrip=symbols"])
        .arg("--target")
        .arg(var("TARGET"))
        .arg("-o")
        .arg(&bin)
        .arg("monitor/main.rs");
    if let Some(linker) = std::env::var_os("RUSTC_LINKER") {
        rustc.arg("-C").arg({
            let mut flag = std::ffi::OsString::from("linker=");
            flag.push(linker);
            flag
        });
    }
    // The operator's flags for this target (a linker, a CPU) apply to the monitor too.
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        rustc.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    match rustc.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("compiling monitor/main.rs failed ({s})")),
        Err(e) => fail(&format!("cannot run rustc: {e}")),
    }
    let bytes = std::fs::read(&bin).unwrap_or_else(|e| fail(&format!("{}: {e}", bin.display())));
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(out.join("dlv-monitor.sha256"), digest)
        .unwrap_or_else(|e| fail(&format!("writing the digest: {e}")));
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
