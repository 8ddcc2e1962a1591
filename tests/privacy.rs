//! Privacy: the daemon (and its shims) connects to nothing but what the operator asked for.
//! The daemon and the registry run in a network namespace of their own; an nftables table there
//! records every new outbound flow (address, protocol, port) of every process in it, and refuses
//! to let any leave but to loopback, the veth and the instances' bridge. A whole scenario runs;
//! the test, from the host, pushes images and sends requests in through the veth (which the
//! recorder does not see: it watches `output`, flows that start inside). At the end the only
//! destinations may be the registry and the instances (proxy and health checks); no DNS.

mod common;

use std::collections::BTreeSet;

use common::{http_get, unique_hex, Daemon, DaemonOptions, Netns, Registry};

/// The recorder: an nft table in the namespace, removed on drop (the namespace goes too).
struct Recorder<'a> {
    netns: &'a Netns,
    table: String,
}

impl<'a> Recorder<'a> {
    fn install(netns: &'a Netns, allowed_v4: &[&str]) -> Recorder<'a> {
        let table = format!("dlv_privacy_{}", unique_hex(6));
        let allowed = allowed_v4.join(", ");
        let ruleset = format!(
            "table inet {table} {{
                set tcp4 {{ type ipv4_addr . inet_service; flags dynamic; }}
                set udp4 {{ type ipv4_addr . inet_service; flags dynamic; }}
                set other4 {{ type ipv4_addr . inet_proto; flags dynamic; }}
                set tcp6 {{ type ipv6_addr . inet_service; flags dynamic; }}
                set udp6 {{ type ipv6_addr . inet_service; flags dynamic; }}
                set other6 {{ type ipv6_addr . inet_proto; flags dynamic; }}
                chain output {{
                    type filter hook output priority -10; policy accept;
                    ct state new meta nfproto ipv4 meta l4proto tcp add @tcp4 {{ ip daddr . tcp dport }}
                    ct state new meta nfproto ipv4 meta l4proto udp add @udp4 {{ ip daddr . udp dport }}
                    ct state new meta nfproto ipv4 meta l4proto != {{ tcp, udp }} add @other4 {{ ip daddr . meta l4proto }}
                    ct state new meta nfproto ipv6 meta l4proto tcp add @tcp6 {{ ip6 daddr . tcp dport }}
                    ct state new meta nfproto ipv6 meta l4proto udp add @udp6 {{ ip6 daddr . udp dport }}
                    ct state new meta nfproto ipv6 meta l4proto != {{ tcp, udp }} add @other6 {{ ip6 daddr . meta l4proto }}
                    ct state new meta nfproto ipv4 ip daddr != {{ {allowed} }} counter drop
                    ct state new meta nfproto ipv6 ip6 daddr != ::1 counter drop
                }}
            }}
"
        );
        let dir = tempfile::Builder::new().prefix("dlv-privacy-").tempdir().expect("temp dir");
        let file = dir.path().join("ruleset.nft");
        std::fs::write(&file, ruleset).expect("write ruleset");
        let recorder = Recorder { netns, table };
        recorder.netns.must_inside(&["nft", "-f", file.to_str().expect("utf-8 path")]);
        recorder
    }

    /// The elements of one set, each as its `a . b` text.
    fn elements(&self, set: &str) -> BTreeSet<String> {
        let text = self.netns.must_inside(&["nft", "list", "set", "inet", &self.table, set]);
        let Some(start) = text.find("elements = {") else {
            return BTreeSet::new();
        };
        let rest = &text[start + "elements = {".len()..];
        let body = &rest[..rest.find('}').unwrap_or(rest.len())];
        body.split(',').map(|e| e.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|e| !e.is_empty()).collect()
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        let _ = self.netns.inside(&["nft", "delete", "table", "inet", &self.table]);
    }
}

/// `IP` of every instance of `app` in `app show --json`.
fn instance_ips(daemon: &Daemon, app: &str) -> BTreeSet<String> {
    let show = daemon.cli_json(&["app", "show", app, "--json"]);
    show["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().or_else(|| i["address"].as_str()))
        .map(|a| a.split(':').next().unwrap_or(a).to_string())
        .collect()
}

#[test]
fn the_daemon_connects_only_to_the_registry_and_its_instances() {
    let netns = Netns::create();
    let registry = Registry::start_in_netns(&netns);
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let proxy = format!("{}:{}", netns.inner_ip(), common::free_port());
    // Recording starts before the daemon does: its start-up is part of the scenario.
    let daemon_options = DaemonOptions {
        args: vec!["--insecure-registry".into(), registry.addr().into()],
        netns: Some(netns.path()),
        http_listen: Some(proxy.clone()),
        ..Default::default()
    };
    // The daemon's subnet is only known once it is named: allow the whole 10.200-250 range the
    // harness picks subnets from, and check the instance addresses precisely below.
    let recorder =
        Recorder::install(&netns, &["127.0.0.0/8", netns.net(), "10.200.0.0/13", "10.208.0.0/12", "10.224.0.0/11"]);
    let daemon = Daemon::start_with(&registry, daemon_options);
    // Instances get addresses from this /24 (an instance replaced mid-scenario gets a new one).
    let subnet = daemon.names().subnet.trim_end_matches("0/24").to_string();

    daemon.cli_ok(&["image", "pull", &image.reference]);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let mut instances = instance_ips(&daemon, "web");
    daemon.cli_ok(&["app", "scale", "web", "3"]);
    instances.extend(instance_ips(&daemon, "web"));
    assert_eq!(instance_ips(&daemon, "web").len(), 3, "three instances with addresses");
    for _ in 0..20 {
        let (status, body) = http_get(&proxy, "web.localhost", "/");
        assert_eq!(status, 200, "{body}\n{}", daemon.log_tail(30));
    }
    let logs = daemon.cli_ok(&["logs", "web", "--tail", "20"]);
    assert!(!logs.trim().is_empty(), "no logs");
    daemon.cli_ok(&["app", "scale", "web", "1"]);
    instances.extend(instance_ips(&daemon, "web"));
    let (status, _) = http_get(&proxy, "web.localhost", "/");
    assert_eq!(status, 200);
    daemon.cli_ok(&["app", "stop", "web"]);
    daemon.cli_ok(&["app", "rm", "web"]);
    drop(daemon);

    let registry_dest = registry.addr().replace(':', " . ");
    let instance_dests: BTreeSet<String> = instances.iter().map(|ip| format!("{ip} . 8080")).collect();
    let is_instance = |d: &str| d.starts_with(&subnet) && d.ends_with(" . 8080");
    let tcp4 = recorder.elements("tcp4");
    let unexpected: Vec<&String> = tcp4.iter().filter(|d| **d != registry_dest && !is_instance(d)).collect();
    assert!(
        unexpected.is_empty(),
        "connections to {unexpected:?} (allowed: registry {registry_dest}, instances {subnet}x port 8080); all: {tcp4:?}"
    );
    // The recorder saw the flows it should have: it is not blind.
    assert!(tcp4.contains(&registry_dest), "no connection to the registry recorded: {tcp4:?}");
    assert!(tcp4.iter().any(|d| instance_dests.contains(d)), "no connection to an instance recorded: {tcp4:?}");
    for set in ["udp4", "tcp6", "udp6"] {
        let found = recorder.elements(set);
        assert!(found.is_empty(), "unexpected {set} flows (DNS is udp 53): {found:?}");
    }
    // The kernel itself announces multicast memberships when the bridge and veths come up
    // (IGMP to 224.0.0.x, ICMPv6 neighbour discovery and MLD to ff02::): link-local control
    // traffic, not connections. Nothing else may appear.
    let other4 = recorder.elements("other4");
    let other6 = recorder.elements("other6");
    let unexpected: Vec<&String> = other4
        .iter()
        .filter(|e| !(e.starts_with("224.0.0.") && e.ends_with(" . igmp")))
        .chain(other6.iter().filter(|e| !(e.starts_with("ff02:") && e.ends_with(" . ipv6-icmp"))))
        .collect();
    assert!(unexpected.is_empty(), "unexpected flows (ICMP...): {unexpected:?}; all: {other4:?} {other6:?}");
}
