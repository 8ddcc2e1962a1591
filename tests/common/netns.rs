//! A network namespace of its own (`dlvns<hex>`) joined to the host by a veth pair on a /30:
//! what runs inside sees only its loopback, the veth and whatever it creates; the test, on the
//! host, reaches it at [`Netns::inner_ip`]. Dropping it deletes the veth and the namespace.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::{run_with_timeout, unique_hex};

pub struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    inner_ip: String,
    /// `10.199.B.C/30`.
    net: String,
}

impl Netns {
    /// Creates the namespace, the veth pair (`dlvh<hex>` on the host, `dlvn<hex>` inside),
    /// addresses, `lo` up, and a default route out through the veth (so that an attempt to
    /// reach any address leaves a packet to observe, instead of failing with "no route").
    pub fn create() -> Netns {
        let hex = unique_hex(6);
        let (host_ip, inner_ip, net) = pick_net();
        let ns = Netns { name: format!("dlvns{hex}"), host_if: format!("dlvh{hex}"), host_ip, inner_ip, net };
        let inner_if = format!("dlvn{hex}");
        // From here on a panic drops `ns`, which removes what exists.
        ns.must(&["ip", "netns", "add", &ns.name]);
        ns.must(&["ip", "link", "add", &ns.host_if, "type", "veth", "peer", "name", &inner_if]);
        ns.must(&["ip", "link", "set", &inner_if, "netns", &ns.name]);
        ns.must(&["ip", "addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if]);
        ns.must(&["ip", "link", "set", &ns.host_if, "up"]);
        ns.must_inside(&["ip", "link", "set", "lo", "up"]);
        ns.must_inside(&["ip", "addr", "add", &format!("{}/30", ns.inner_ip), "dev", &inner_if]);
        ns.must_inside(&["ip", "link", "set", &inner_if, "up"]);
        ns.must_inside(&["ip", "route", "add", "default", "via", &ns.host_ip]);
        // IPv6 as well, when the kernel has it: a default route for attempts to leave a packet.
        let _ = ns.inside(&["ip", "-6", "route", "add", "default", "dev", &inner_if]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for [`enter_in_child`].
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's address on the veth (where the host reaches it).
    pub fn inner_ip(&self) -> &str {
        &self.inner_ip
    }

    /// The /30 of the veth pair (`10.199.B.C/30`).
    pub fn net(&self) -> &str {
        &self.net
    }

    /// Runs `argv` inside the namespace (`ip netns exec`).
    pub fn inside(&self, argv: &[&str]) -> std::io::Result<Output> {
        run_with_timeout(Command::new("ip").args(["netns", "exec", &self.name]).args(argv), Duration::from_secs(30))
    }

    /// Like [`Netns::inside`], panicking with its stderr if it fails; returns stdout.
    pub fn must_inside(&self, argv: &[&str]) -> String {
        let out = self.inside(argv).unwrap_or_else(|e| panic!("ip netns exec {} {}: {e}", self.name, argv.join(" ")));
        assert!(
            out.status.success(),
            "ip netns exec {} {} failed: {}",
            self.name,
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn must(&self, argv: &[&str]) {
        let out = run_with_timeout(Command::new(argv[0]).args(&argv[1..]), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{}: {e}", argv.join(" ")));
        assert!(out.status.success(), "{} failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the host end deletes its peer; the namespace goes once nothing is left in it.
        if Path::new("/sys/class/net").join(&self.host_if).exists() {
            let _ = run_with_timeout(Command::new("ip").args(["link", "del", &self.host_if]), Duration::from_secs(20));
        }
        if self.path().exists() {
            match run_with_timeout(Command::new("ip").args(["netns", "delete", &self.name]), Duration::from_secs(20)) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "harness: cannot delete netns {}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("harness: cannot delete netns {}: {e}", self.name),
            }
        }
    }
}

/// Makes `cmd`'s child join the network namespace at `path` before it runs.
pub fn enter_in_child(cmd: &mut Command, path: &Path) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: between fork and exec the closure only calls setns(2), which is async-signal-safe,
    // on a descriptor the closure owns (moved in, alive until the command is dropped).
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd;
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `10.199.B.C/30` used by no interface on the machine: (host address, inner address, net).
fn pick_net() -> (String, String, String) {
    let in_use = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    for _ in 0..1000 {
        let n = u32::from_str_radix(&unique_hex(4), 16).unwrap_or(0) % (256 * 64);
        let (b, c) = (n / 64, (n % 64) * 4);
        let (host, inner) = (format!("10.199.{b}.{}", c + 1), format!("10.199.{b}.{}", c + 2));
        if !in_use.contains(&format!("10.199.{b}.{c}")) && !in_use.contains(&host) && !in_use.contains(&inner) {
            return (host, inner, format!("10.199.{b}.{c}/30"));
        }
    }
    panic!("no free 10.199.x.y/30 for a test network namespace")
}
