//! `dlv-monitor`: the monitor a shim becomes once its container runs (see serve.rs). A
//! separate, std-only program so that what stays resident per instance is small; it is
//! embedded in the `deliverous` binary, which writes it out and execs it.

mod clock;
#[allow(dead_code)] // `to_env` is the shim's side of the hand-off.
mod handoff;
mod json;
mod log;
mod reason;
mod serve;

fn main() {
    std::process::exit(serve::main())
}
