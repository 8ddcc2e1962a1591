//! Tests of the network plumbing: pure naming/validation rules, and the real kernel objects
//! (root only: skipped otherwise). Each test uses its own names (`dlvt<hex>` bridge,
//! `dlvt_<hex>` table, `dlvu` veths, a random 10.231.X.0/24) and a guard that removes
//! everything, also when the test fails. `ip`, `nft`, `nsenter` and `ping` only check results.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use super::*;

// ---- pure functions -------------------------------------------------------------------------

#[test]
fn instance_mac_is_derived_from_the_address() {
    assert_eq!(instance_mac(Ipv4Addr::new(10, 88, 1, 2)), [0x02, 0x42, 10, 88, 1, 2]);
}

#[test]
fn veth_name_fits_in_ifnamsiz() {
    assert_eq!(veth_name("dlv", "0123456789abcdef"), "dlv0123456789ab");
    assert_eq!(veth_name("dlv", "0123456789abcdef").len(), MAX_IFNAME_LEN);
    assert_eq!(veth_name("dlv", "abc"), "dlvabc");
    assert_eq!(veth_name("dlv", "web.1/x y"), "dlvweb.1xy");
    assert_eq!(veth_name("averyveryverylongprefix", "abc"), "averyveryverylo");
}

fn config(bridge: &str, subnet: &str, table: &str, prefix: &str) -> NetworkConfig {
    NetworkConfig {
        bridge: bridge.into(),
        subnet: subnet.parse().unwrap(),
        nft_table: table.into(),
        veth_prefix: prefix.into(),
    }
}

#[test]
fn config_validation_names_the_bad_field() {
    let good = config("dlv0", "10.88.0.0/16", "deliverous", "dlv");
    assert!(good.validate().is_ok());
    assert_eq!(good.gateway(), Ipv4Addr::new(10, 88, 0, 1));
    let cases = [
        (config("", "10.88.0.0/16", "deliverous", "dlv"), "bridge name"),
        (config("dlv0123456789abc", "10.88.0.0/16", "deliverous", "dlv"), "bridge name"),
        (config("dl v0", "10.88.0.0/16", "deliverous", "dlv"), "bridge name"),
        (config("dlv0", "10.88.0.0/16", "deliverous", "dlv/"), "veth prefix"),
        (config("dlv0", "10.88.0.0/16", "deliverous", "dlv012345678"), "veth prefix"),
        (config("dlv0", "10.88.0.0/16", "", "dlv"), "nft table"),
        (config("dlv0", "10.88.0.0/16", "bad name", "dlv"), "nft table"),
        (config("dlv0", "10.88.0.0/31", "deliverous", "dlv"), "prefix length"),
        (config("dlv0", "10.0.0.0/7", "deliverous", "dlv"), "prefix length"),
    ];
    for (cfg, expected) in cases {
        let error = HostNetwork::new(cfg.clone()).unwrap_err().to_string();
        assert!(error.contains(expected), "{cfg:?}: {error}");
    }
}

#[test]
fn config_round_trips_through_serde() {
    let cfg = config("dlv0", "10.88.0.0/16", "deliverous", "dlv");
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"10.88.0.0/16\""), "{json}");
    assert_eq!(serde_json::from_str::<NetworkConfig>(&json).unwrap(), cfg);
}

// ---- kernel tests ---------------------------------------------------------------------------

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (creates bridges, namespaces, nft tables)");
            return;
        }
    };
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).unwrap();
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Owns one test's host network and sandboxes; removes them on drop, even after a panic.
struct TestNet {
    net: HostNetwork,
    sandboxes: Vec<(PathBuf, String)>,
    /// Interfaces a test made with `ip` itself.
    links: Vec<String>,
    dir: tempfile::TempDir,
}

impl TestNet {
    fn new() -> TestNet {
        let id = hex(&random_bytes::<3>());
        let third = random_bytes::<1>()[0];
        let cfg = NetworkConfig {
            bridge: format!("dlvt{id}"),
            subnet: format!("10.231.{third}.0/24").parse().unwrap(),
            nft_table: format!("dlvt_{id}"),
            veth_prefix: "dlvu".into(),
        };
        TestNet {
            net: HostNetwork::new(cfg).unwrap(),
            sandboxes: Vec::new(),
            links: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cfg(&self) -> &NetworkConfig {
        self.net.config()
    }

    fn host_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.cfg().subnet.network().octets();
        Ipv4Addr::new(a, b, c, host)
    }

    /// A sandbox slot (namespace path + veth name) registered for cleanup.
    fn slot(&mut self) -> (PathBuf, String) {
        let uid = hex(&random_bytes::<6>());
        let slot = (self.dir.path().join(format!("dlvns-{uid}")), veth_name(&self.cfg().veth_prefix, &uid));
        self.sandboxes.push(slot.clone());
        slot
    }

    fn sandbox(&mut self, host: u8) -> (PathBuf, String, Ipv4Addr) {
        let (path, veth) = self.slot();
        let ip = self.host_ip(host);
        self.net.create_sandbox(&path, &veth, ip).unwrap();
        (path, veth, ip)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for (path, veth) in &self.sandboxes {
            if let Err(e) = self.net.remove_sandbox(path, veth) {
                eprintln!("cleanup: {e}");
            }
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        if let Err(e) = self.net.teardown() {
            eprintln!("cleanup: {e}");
        }
    }
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(program).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn json(program: &str, args: &[&str]) -> serde_json::Value {
    let (ok, text) = run(program, args);
    assert!(ok, "{program} {args:?}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{program} {args:?}: {e}: {text}"))
}

fn link_exists(name: &str) -> bool {
    run("ip", &["link", "show", "dev", name]).0
}

/// `ip -j addr show` output for one interface (optionally inside a namespace).
fn interface(ns: Option<&Path>, name: &str) -> serde_json::Value {
    let ns_arg = ns.map(|p| format!("--net={}", p.display()));
    let value = match &ns_arg {
        Some(arg) => json("nsenter", &[arg, "ip", "-j", "addr", "show", "dev", name]),
        None => json("ip", &["-j", "addr", "show", "dev", name]),
    };
    value[0].clone()
}

fn has_flag(iface: &serde_json::Value, flag: &str) -> bool {
    iface["flags"].as_array().is_some_and(|f| f.iter().any(|v| v == flag))
}

fn has_ipv4(iface: &serde_json::Value, ip: Ipv4Addr, prefix: u8) -> bool {
    iface["addr_info"].as_array().is_some_and(|addrs| {
        addrs.iter().any(|a| a["family"] == "inet" && a["local"] == ip.to_string() && a["prefixlen"] == prefix)
    })
}

fn ping(ns: &Path, target: Ipv4Addr) -> (bool, String) {
    run("nsenter", &[&format!("--net={}", ns.display()), "ping", "-c1", "-W2", &target.to_string()])
}

#[test]
fn ensure_creates_bridge_table_and_forwarding_idempotently() {
    require_root!();
    let t = TestNet::new();
    let cfg = t.cfg().clone();
    t.net.ensure().unwrap();
    t.net.ensure().unwrap();

    let bridge = interface(None, &cfg.bridge);
    assert!(has_flag(&bridge, "UP"), "{bridge}");
    assert!(has_ipv4(&bridge, cfg.gateway(), 24), "{bridge}");
    assert_eq!(bridge["addr_info"].as_array().map(|a| a.iter().filter(|a| a["family"] == "inet").count()), Some(1));
    let details = json("ip", &["-j", "-d", "link", "show", "dev", &cfg.bridge]);
    assert_eq!(details[0]["linkinfo"]["info_kind"], "bridge");

    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(forward.trim(), "1");

    let (ok, table) = run("nft", &["list", "table", "ip", &cfg.nft_table]);
    assert!(ok, "{table}");
    assert!(table.contains("type nat hook postrouting priority srcnat"), "{table}");
    assert!(table.contains(&format!("ip saddr {} oifname != \"{}\" masquerade", cfg.subnet, cfg.bridge)), "{table}");
    // Replaced, not appended to: one rule only after two ensure() calls.
    assert_eq!(table.matches("masquerade").count(), 1, "{table}");

    t.net.teardown().unwrap();
    assert!(!link_exists(&cfg.bridge));
    assert!(!run("nft", &["list", "table", "ip", &cfg.nft_table]).0);
    t.net.teardown().unwrap();
}

#[test]
fn ensure_converges_a_drifted_bridge() {
    require_root!();
    let t = TestNet::new();
    let cfg = t.cfg().clone();
    t.net.ensure().unwrap();
    assert!(run("ip", &["link", "set", "dev", &cfg.bridge, "down"]).0);
    assert!(run("ip", &["addr", "add", "192.0.2.1/24", "dev", &cfg.bridge]).0);
    assert!(run("nft", &["delete", "table", "ip", &cfg.nft_table]).0);
    t.net.ensure().unwrap();
    let bridge = interface(None, &cfg.bridge);
    assert!(has_flag(&bridge, "UP"), "{bridge}");
    assert!(has_ipv4(&bridge, cfg.gateway(), 24), "{bridge}");
    assert!(!has_ipv4(&bridge, Ipv4Addr::new(192, 0, 2, 1), 24), "{bridge}");
    assert!(run("nft", &["list", "table", "ip", &cfg.nft_table]).0);
}

#[test]
fn ensure_refuses_a_non_bridge_with_the_bridge_name() {
    require_root!();
    let mut t = TestNet::new();
    let cfg = t.cfg().clone();
    t.links.push(cfg.bridge.clone());
    let peer = format!("{}p", cfg.bridge);
    let (ok, out) = run("ip", &["link", "add", &cfg.bridge, "type", "veth", "peer", "name", &peer]);
    assert!(ok, "{out}");
    let error = t.net.ensure().unwrap_err().to_string();
    assert!(error.contains("is not a bridge"), "{error}");
    // teardown() leaves a non-bridge alone.
    t.net.teardown().unwrap();
    assert!(link_exists(&cfg.bridge));
    assert!(run("ip", &["link", "del", &cfg.bridge]).0);
}

#[test]
fn sandboxes_reach_the_gateway_and_each_other() {
    require_root!();
    let mut t = TestNet::new();
    t.net.ensure().unwrap();
    let cfg = t.cfg().clone();
    let (ns1, veth1, ip1) = t.sandbox(2);
    let (ns2, veth2, ip2) = t.sandbox(3);
    assert!(sandbox_exists(&ns1) && sandbox_exists(&ns2));

    let eth0 = interface(Some(&ns1), "eth0");
    assert!(has_flag(&eth0, "UP"), "{eth0}");
    assert!(has_ipv4(&eth0, ip1, 24), "{eth0}");
    let [a, b, c, d] = ip1.octets();
    assert_eq!(eth0["address"], format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}"), "MAC follows the IP: {eth0}");
    let lo = interface(Some(&ns1), "lo");
    assert!(has_flag(&lo, "UP"), "{lo}");
    let ns_arg = format!("--net={}", ns1.display());
    let routes = json("nsenter", &[&ns_arg, "ip", "-j", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], cfg.gateway().to_string(), "{routes}");
    assert_eq!(routes[0]["dev"], "eth0", "{routes}");

    let host_veth = json("ip", &["-j", "-d", "link", "show", "dev", &veth1]);
    assert_eq!(host_veth[0]["master"], cfg.bridge, "{host_veth}");
    assert!(has_flag(&host_veth[0], "UP"), "{host_veth}");

    let (ok, out) = ping(&ns1, cfg.gateway());
    assert!(ok, "ping gateway: {out}");
    let (ok, out) = ping(&ns1, ip2);
    assert!(ok, "ping {ip2} from {ip1}: {out}");
    let (ok, out) = ping(&ns2, ip1);
    assert!(ok, "ping {ip1} from {ip2}: {out}");

    t.net.remove_sandbox(&ns1, &veth1).unwrap();
    assert!(!link_exists(&veth1));
    assert!(!ns1.exists());
    assert!(!sandbox_exists(&ns1));
    t.net.remove_sandbox(&ns1, &veth1).unwrap();
    // The other sandbox is untouched.
    assert!(link_exists(&veth2));
    assert!(ping(&ns2, cfg.gateway()).0);
}

/// The gateway's MAC must not follow the bridge's ports: instances cache it, and a change would
/// silently drop their replies to the host until their ARP entries expire.
#[test]
fn bridge_mac_is_fixed_whatever_ports_come_and_go() {
    require_root!();
    let mut t = TestNet::new();
    t.net.ensure().unwrap();
    let bridge = t.cfg().bridge.clone();
    let [a, b, c, d] = t.cfg().gateway().octets();
    let expected = format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}");
    let mac = || interface(None, &bridge)["address"].as_str().unwrap_or_default().to_string();
    assert_eq!(mac(), expected);
    let (ns1, veth1, _) = t.sandbox(2);
    let (ns2, _, _) = t.sandbox(3);
    assert_eq!(mac(), expected, "after adding ports");
    t.net.remove_sandbox(&ns1, &veth1).unwrap();
    assert_eq!(mac(), expected, "after removing a port");
    assert!(ping(&ns2, t.cfg().gateway()).0);
    // A bridge whose MAC drifted (an older version, or someone else) is put right.
    run("ip", &["link", "set", "dev", &bridge, "address", "02:00:00:00:00:99"]);
    t.net.ensure().unwrap();
    assert_eq!(mac(), expected, "ensure repairs the MAC");
}

#[test]
fn failed_sandbox_creation_leaves_nothing_behind() {
    require_root!();
    let mut t = TestNet::new();
    t.net.ensure().unwrap();
    let (_, taken_veth, _) = t.sandbox(2);
    let (path, _) = t.slot();
    let error = t.net.create_sandbox(&path, &taken_veth, t.host_ip(3)).unwrap_err();
    assert_eq!(error.errno(), Some(libc::EEXIST), "{error}");
    assert!(error.to_string().contains(&taken_veth), "{error}");
    assert!(!path.exists(), "namespace file left behind");
    assert!(link_exists(&taken_veth), "the existing veth must not be touched");
}

#[test]
fn sandbox_requests_are_checked() {
    require_root!();
    let mut t = TestNet::new();
    let (path, veth) = t.slot();
    // No bridge yet.
    let error = t.net.create_sandbox(&path, &veth, t.host_ip(2)).unwrap_err().to_string();
    assert!(error.contains("HostNetwork::ensure"), "{error}");
    t.net.ensure().unwrap();
    let error = t.net.create_sandbox(&path, &veth, t.host_ip(1)).unwrap_err().to_string();
    assert!(error.contains("gateway"), "{error}");
    let error = t.net.create_sandbox(&path, &veth, Ipv4Addr::new(192, 0, 2, 2)).unwrap_err().to_string();
    assert!(error.contains("outside the subnet"), "{error}");
    let error = t.net.create_sandbox(&path, "dlvu/x", t.host_ip(2)).unwrap_err().to_string();
    assert!(error.contains("veth name"), "{error}");
    assert!(!path.exists());

    std::fs::write(&path, b"").unwrap();
    let error = t.net.create_sandbox(&path, &veth, t.host_ip(2)).unwrap_err();
    assert!(matches!(error, NetworkError::SandboxExists { .. }), "{error}");
    assert!(!sandbox_exists(&path));
    t.net.remove_sandbox(&path, &veth).unwrap();
    assert!(!path.exists());
}

#[test]
fn egress_is_masqueraded() {
    require_root!();
    let mut t = TestNet::new();
    t.net.ensure().unwrap();
    let (sandbox, _, _) = t.sandbox(2);

    // An "outside" network: a namespace on a /30 reached through a plain veth, with no route
    // back to the instances' subnet, so it can only answer if their traffic is masqueraded.
    let (outside, outside_veth) = t.slot();
    let k = random_bytes::<1>()[0] % 64;
    let host_side = Ipv4Addr::new(198, 51, 100, 4 * k + 1);
    let far_side = Ipv4Addr::new(198, 51, 100, 4 * k + 2);
    std::fs::write(&outside, b"").unwrap();
    let outside_arg = format!("--net={}", outside.display());
    let steps: Vec<Vec<String>> = vec![
        vec!["unshare".into(), outside_arg.clone(), "true".into()],
        ["ip", "link", "add", &outside_veth, "type", "veth", "peer", "name", "eth0", "netns"]
            .iter()
            .map(|s| s.to_string())
            .chain([outside.display().to_string()])
            .collect(),
        ["ip", "addr", "add", &format!("{host_side}/30"), "dev", &outside_veth].map(String::from).to_vec(),
        ["ip", "link", "set", &outside_veth, "up"].map(String::from).to_vec(),
        ["nsenter", &outside_arg, "ip", "addr", "add", &format!("{far_side}/30"), "dev", "eth0"]
            .map(String::from)
            .to_vec(),
        ["nsenter", &outside_arg, "ip", "link", "set", "eth0", "up"].map(String::from).to_vec(),
    ];
    for step in &steps {
        let args: Vec<&str> = step[1..].iter().map(String::as_str).collect();
        let (ok, out) = run(&step[0], &args);
        assert!(ok, "{step:?}: {out}");
    }
    let (ok, out) = ping(&sandbox, far_side);
    assert!(ok, "ping {far_side} through the masquerade: {out}");

    // Without the nft table, the same ping gets no answer.
    // (A new ping process uses a new ICMP id, hence a new, un-NATed conntrack entry.)
    nft::remove_table(&t.cfg().nft_table).unwrap();
    let (ok, _) = ping(&sandbox, far_side);
    assert!(!ok, "the far side answered without masquerading: the test proves nothing");
}

#[test]
fn sandboxes_are_created_and_removed_concurrently() {
    require_root!();
    let mut t = TestNet::new();
    t.net.ensure().unwrap();
    let slots: Vec<(PathBuf, String, Ipv4Addr)> = (0..8)
        .map(|i| {
            let (path, veth) = t.slot();
            (path, veth, t.host_ip(10 + i))
        })
        .collect();
    std::thread::scope(|scope| {
        for (path, veth, ip) in &slots {
            let net = &t.net;
            scope.spawn(move || net.create_sandbox(path, veth, *ip).unwrap());
        }
    });
    for (path, veth, ip) in &slots {
        assert!(sandbox_exists(path));
        assert!(link_exists(veth));
        assert!(has_ipv4(&interface(Some(path), "eth0"), *ip, 24));
    }
    let (first, _, _) = &slots[0];
    let (_, _, last_ip) = &slots[7];
    assert!(ping(first, *last_ip).0);
    std::thread::scope(|scope| {
        for (path, veth, _) in &slots {
            let net = &t.net;
            scope.spawn(move || net.remove_sandbox(path, veth).unwrap());
        }
    });
    for (path, veth, _) in &slots {
        assert!(!path.exists());
        assert!(!link_exists(veth));
    }
}
