//! Container network plumbing: the host bridge, the nf_tables masquerade table and IPv4
//! forwarding (`HostNetwork::ensure`/`teardown`), and one network namespace per instance with a
//! veth into the bridge (`create_sandbox`/`remove_sandbox`). Everything goes over netlink,
//! in-process; every function is synchronous and safe to call from a multi-threaded process.

mod error;
mod netlink;
mod netns;
mod nft;
mod rtnl;
mod subnet;
#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_packet_route::link::InfoKind;
use serde::{Deserialize, Serialize};

pub use error::NetworkError;
pub use subnet::Ipv4Net;

use rtnl::Rtnl;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Longest veth prefix: leaves at least 4 characters of the instance id in a veth name.
pub const MAX_VETH_PREFIX_LEN: usize = MAX_IFNAME_LEN - 4;
/// Longest nf_tables table name (NFT_NAME_MAXLEN - 1).
const MAX_NFT_NAME_LEN: usize = 255;
/// Name of the instance's interface inside its namespace.
pub const SANDBOX_INTERFACE: &str = "eth0";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The kernel objects one deliverous host network is made of; every name is configurable so
/// that tests and several daemons can run side by side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Bridge name, e.g. `dlv0`.
    pub bridge: String,
    /// The instances' subnet; the bridge takes its first host address.
    pub subnet: Ipv4Net,
    /// nf_tables table (family `ip`) holding the masquerade rule, e.g. `deliverous`.
    pub nft_table: String,
    /// Prefix of the host-side veth names, e.g. `dlv`.
    pub veth_prefix: String,
}

impl NetworkConfig {
    /// The bridge's address and the instances' default gateway: the subnet's first host.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.first_host()
    }

    /// Checks every field; says which one is wrong and why.
    pub fn validate(&self) -> Result<(), NetworkError> {
        check_ifname(&self.bridge)
            .map_err(|why| NetworkError::InvalidConfig(format!("bridge name {:?}: {why}", self.bridge)))?;
        check_ifname(&self.veth_prefix)
            .map_err(|why| NetworkError::InvalidConfig(format!("veth prefix {:?}: {why}", self.veth_prefix)))?;
        if self.veth_prefix.len() > MAX_VETH_PREFIX_LEN {
            return Err(NetworkError::InvalidConfig(format!(
                "veth prefix {:?} is {} bytes long: at most {MAX_VETH_PREFIX_LEN} leave room for the instance id",
                self.veth_prefix,
                self.veth_prefix.len()
            )));
        }
        check_nft_name(&self.nft_table)
            .map_err(|why| NetworkError::InvalidConfig(format!("nft table name {:?}: {why}", self.nft_table)))?;
        let prefix = self.subnet.prefix_len();
        if !(8..=30).contains(&prefix) {
            return Err(NetworkError::InvalidConfig(format!(
                "subnet {}: prefix length must be 8..=30 (a gateway plus at least one instance), found {prefix}",
                self.subnet
            )));
        }
        Ok(())
    }
}

/// Why `name` cannot be a network interface name, if it cannot.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(format!("is {} bytes long, the kernel allows at most {MAX_IFNAME_LEN}", name.len()));
    }
    if name == "." || name == ".." {
        return Err("is reserved".into());
    }
    if let Some(bad) = name.chars().find(|c| !is_ifname_char(*c)) {
        return Err(format!("contains {bad:?}: use letters, digits, '-', '_' or '.'"));
    }
    Ok(())
}

fn is_ifname_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn check_nft_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NFT_NAME_LEN {
        return Err(format!("is longer than {MAX_NFT_NAME_LEN} bytes"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("must start with a letter".into());
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("contains {bad:?}: use letters, digits, '_' or '-'"));
    }
    Ok(())
}

/// Host-side veth name of an instance: `prefix` followed by as many characters of
/// `instance_uid` as fit in an interface name (15 bytes). Characters an interface name cannot
/// hold are skipped. Distinct instances need distinct leading uid characters.
/// The MAC address of the interface that has `ip` (an instance's `eth0`, or the bridge for the
/// gateway address): `02:42` (locally administered) then the four bytes of the address, as
/// Docker does. A freed address is soon leased again; with
/// the same MAC, neighbours' ARP caches stay right and the new instance is reachable at once.
pub fn instance_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

pub fn veth_name(prefix: &str, instance_uid: &str) -> String {
    let mut name: String = prefix.chars().filter(|c| is_ifname_char(*c)).take(MAX_IFNAME_LEN).collect();
    let room = MAX_IFNAME_LEN.saturating_sub(name.len());
    name.extend(instance_uid.chars().filter(|c| is_ifname_char(*c)).take(room));
    name
}

/// Whether `ns_path` is a mounted network namespace file (a sandbox that was created and not
/// removed).
pub fn sandbox_exists(ns_path: &Path) -> bool {
    netns::exists(ns_path)
}

/// The host side of the container network, as described by a validated `NetworkConfig`.
/// Holds no kernel resources itself: every call opens what it needs and closes it.
#[derive(Debug, Clone)]
pub struct HostNetwork {
    config: NetworkConfig,
}

fn open_host_rtnl(operation: &str) -> Result<Rtnl, NetworkError> {
    Rtnl::open().map_err(|e| e.during(format!("{operation}: open rtnetlink socket")))
}

impl HostNetwork {
    pub fn new(config: NetworkConfig) -> Result<Self, NetworkError> {
        config.validate()?;
        Ok(HostNetwork { config })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// Idempotent: the bridge exists, is up and has exactly the gateway address (other IPv4
    /// addresses are removed); IPv4 forwarding is on; the nft table is (atomically) replaced by
    /// a `postrouting` nat chain masquerading the subnet's traffic that leaves by another
    /// interface than the bridge.
    pub fn ensure(&self) -> Result<(), NetworkError> {
        let cfg = &self.config;
        let mut rtnl = open_host_rtnl("ensure host network")?;
        let bridge = ensure_bridge(&mut rtnl, &cfg.bridge)?;
        let gateway = cfg.gateway();
        // A bridge without a MAC of its own takes the lowest of its ports' and changes it as
        // instances come and go (to all zeros with no port at all). Instances that cached the
        // gateway's old MAC would then send their replies nowhere until their ARP entry expires.
        rtnl.set_mac(bridge.index, instance_mac(gateway))
            .map_err(|e| e.during(format!("set the MAC address of bridge {:?}", cfg.bridge)))?;
        let prefix = cfg.subnet.prefix_len();
        let existing = rtnl
            .ipv4_addresses(bridge.index)
            .map_err(|e| e.during(format!("list addresses of bridge {:?}", cfg.bridge)))?;
        for (ip, len) in existing {
            if (ip, len) != (gateway, prefix) {
                rtnl.delete_address(bridge.index, ip, len)
                    .map_err(|e| e.during(format!("remove stale address {ip}/{len} from bridge {:?}", cfg.bridge)))?;
            }
        }
        rtnl.add_address(bridge.index, gateway, prefix, cfg.subnet.broadcast())
            .map_err(|e| e.during(format!("add address {gateway}/{prefix} to bridge {:?}", cfg.bridge)))?;
        if !bridge.up {
            rtnl.set_up(bridge.index).map_err(|e| e.during(format!("set bridge {:?} up", cfg.bridge)))?;
        }
        enable_ip_forward()?;
        nft::replace_table(&nft::MasqueradeTable { table: &cfg.nft_table, subnet: cfg.subnet, bridge: &cfg.bridge })
    }

    /// Idempotent: deletes the nft table and the bridge; missing ones are fine (and a
    /// non-bridge interface with the bridge's name is left alone). Leaves `ip_forward` as it is
    /// (other software may rely on it). Sandboxes should be removed first; their veths would
    /// otherwise stay, detached from any bridge.
    pub fn teardown(&self) -> Result<(), NetworkError> {
        let cfg = &self.config;
        let table = nft::remove_table(&cfg.nft_table);
        let bridge =
            open_host_rtnl("tear down host network").and_then(|mut rtnl| delete_bridge(&mut rtnl, &cfg.bridge));
        match (table, bridge) {
            (Ok(()), result) | (result, Ok(())) => result,
            (Err(table), Err(bridge)) => Err(table.with_cleanup(Err(bridge))),
        }
    }

    /// Creates the sandbox of one instance: a network namespace bind-mounted at `ns_path` (its
    /// parent directory must exist, the file must not), a veth pair whose host end `veth_name`
    /// is in the bridge and up, and whose other end is `eth0` in the namespace with `ip` on the
    /// subnet, up; `lo` up; a default route via the gateway. On failure, what was done is undone.
    pub fn create_sandbox(&self, ns_path: &Path, veth_name: &str, ip: Ipv4Addr) -> Result<(), NetworkError> {
        let (mut host, bridge) = self.sandbox_host(&format!("create sandbox {ns_path:?}"), veth_name, ip)?;
        let (netns, inside) = netns::create(ns_path)?;
        self.plug(&mut host, bridge, ns_path, netns, inside, veth_name, ip)
    }

    /// What creating or adopting a sandbox checks first: the veth name, the address, and the
    /// bridge (its index); with the host's netlink socket.
    fn sandbox_host(&self, what: &str, veth_name: &str, ip: Ipv4Addr) -> Result<(Rtnl, u32), NetworkError> {
        let cfg = &self.config;
        check_ifname(veth_name)
            .map_err(|why| NetworkError::InvalidSandbox(format!("veth name {veth_name:?}: {why}")))?;
        cfg.subnet.check_instance_address(ip).map_err(NetworkError::InvalidSandbox)?;
        let mut host = open_host_rtnl(what)?;
        let bridge = host
            .link(&cfg.bridge)
            .map_err(|e| e.during(format!("look up bridge {:?}", cfg.bridge)))?
            .ok_or_else(|| {
                NetworkError::InvalidSandbox(format!(
                    "bridge {:?} does not exist: call HostNetwork::ensure first",
                    cfg.bridge
                ))
            })?;
        Ok((host, bridge.index))
    }

    /// [`create_sandbox`](Self::create_sandbox) for a network namespace that already exists
    /// (`source`, e.g. `/proc/<pid>/ns/net` of a container with a user namespace of its own,
    /// whose network namespace must be owned by that user namespace): it is bound at `ns_path`
    /// and configured the same way. Needs to run as root on the host.
    pub fn adopt_sandbox(
        &self,
        ns_path: &Path,
        source: &Path,
        veth_name: &str,
        ip: Ipv4Addr,
    ) -> Result<(), NetworkError> {
        let (mut host, bridge) = self.sandbox_host(&format!("adopt sandbox {ns_path:?}"), veth_name, ip)?;
        let (netns, inside) = netns::adopt(ns_path, source)?;
        self.plug(&mut host, bridge, ns_path, netns, inside, veth_name, ip)
    }

    /// The veth pair between the bridge and the namespace at `ns_path`, and the namespace's
    /// side configured; on failure the veth and the namespace file are removed.
    #[allow(clippy::too_many_arguments)]
    fn plug(
        &self,
        host: &mut Rtnl,
        bridge_index: u32,
        ns_path: &Path,
        netns: std::fs::File,
        mut inside: Rtnl,
        veth_name: &str,
        ip: Ipv4Addr,
    ) -> Result<(), NetworkError> {
        let cfg = &self.config;
        let undo_namespace = |error: NetworkError| error.with_cleanup(netns::remove(ns_path));

        host.add_veth(veth_name, bridge_index, SANDBOX_INTERFACE, instance_mac(ip), netns.as_raw_fd()).map_err(
            |e| {
                undo_namespace(e.during(format!(
                    "create veth {veth_name:?} (bridge {:?}) with peer {SANDBOX_INTERFACE} in {ns_path:?}",
                    cfg.bridge
                )))
            },
        )?;
        drop(netns);

        configure_inside(&mut inside, ns_path, ip, cfg.subnet, cfg.gateway()).map_err(|error| {
            let veth =
                host.delete_link(veth_name).map(|_| ()).map_err(|e| e.during(format!("delete veth {veth_name:?}")));
            undo_namespace(error.with_cleanup(veth))
        })
    }

    /// Idempotent: deletes the host veth if present, then unmounts and removes the namespace
    /// file if present.
    pub fn remove_sandbox(&self, ns_path: &Path, veth_name: &str) -> Result<(), NetworkError> {
        let veth = if check_ifname(veth_name).is_ok() {
            open_host_rtnl(&format!("remove sandbox {ns_path:?}")).and_then(|mut rtnl| {
                rtnl.delete_link(veth_name).map(|_| ()).map_err(|e| e.during(format!("delete veth {veth_name:?}")))
            })
        } else {
            // No such interface can exist.
            Ok(())
        };
        let namespace = netns::remove(ns_path);
        match (veth, namespace) {
            (Ok(()), result) | (result, Ok(())) => result,
            (Err(veth), Err(namespace)) => Err(veth.with_cleanup(Err(namespace))),
        }
    }
}

/// Bridge `name`, created (and up) if missing; an existing non-bridge link is an error.
fn ensure_bridge(rtnl: &mut Rtnl, name: &str) -> Result<rtnl::Link, NetworkError> {
    let lookup = |rtnl: &mut Rtnl| rtnl.link(name).map_err(|e| e.during(format!("look up bridge {name:?}")));
    let link = match lookup(rtnl)? {
        Some(link) => link,
        None => {
            match rtnl.add_bridge(name) {
                // Another caller created it meanwhile: fine.
                Err(e) if e.errno() != Some(libc::EEXIST) => {
                    return Err(e.during(format!("create bridge {name:?}")));
                }
                _ => {}
            }
            lookup(rtnl)?.ok_or_else(|| NetworkError::Protocol {
                operation: format!("create bridge {name:?}"),
                reason: "the bridge is missing right after its creation".into(),
            })?
        }
    };
    if link.kind != Some(InfoKind::Bridge) {
        return Err(NetworkError::InvalidConfig(format!(
            "interface {name:?} exists but is not a bridge (kind {:?}): choose another bridge name or delete it",
            link.kind
        )));
    }
    Ok(link)
}

/// Deletes bridge `name` if it exists; a link of another kind with that name is not ours and
/// is left alone.
fn delete_bridge(rtnl: &mut Rtnl, name: &str) -> Result<(), NetworkError> {
    let operation = || format!("delete bridge {name:?}");
    match rtnl.link(name).map_err(|e| e.during(operation()))? {
        Some(link) if link.kind == Some(InfoKind::Bridge) => {
            rtnl.delete_link(name).map(|_| ()).map_err(|e| e.during(operation()))
        }
        Some(link) => {
            tracing::warn!(interface = name, kind = ?link.kind, "not deleting interface: it is not a bridge");
            Ok(())
        }
        None => Ok(()),
    }
}

/// Inside the sandbox: `lo` up, the address on `eth0`, `eth0` up, default route.
fn configure_inside(
    rtnl: &mut Rtnl,
    ns_path: &Path,
    ip: Ipv4Addr,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
) -> Result<(), NetworkError> {
    let find = |rtnl: &mut Rtnl, name: &str| {
        rtnl.link(name).map_err(|e| e.during(format!("look up {name} in {ns_path:?}")))?.ok_or_else(|| {
            NetworkError::Protocol {
                operation: format!("configure sandbox {ns_path:?}"),
                reason: format!("{name} is missing from the namespace"),
            }
        })
    };
    let lo = find(rtnl, "lo")?;
    rtnl.set_up(lo.index).map_err(|e| e.during(format!("set lo up in {ns_path:?}")))?;
    let eth0 = find(rtnl, SANDBOX_INTERFACE)?;
    let prefix = subnet.prefix_len();
    rtnl.add_address(eth0.index, ip, prefix, subnet.broadcast())
        .map_err(|e| e.during(format!("add address {ip}/{prefix} to {SANDBOX_INTERFACE} in {ns_path:?}")))?;
    if !eth0.up {
        rtnl.set_up(eth0.index).map_err(|e| e.during(format!("set {SANDBOX_INTERFACE} up in {ns_path:?}")))?;
    }
    rtnl.replace_default_route(gateway, eth0.index)
        .map_err(|e| e.during(format!("add default route via {gateway} in {ns_path:?}")))
}

/// `net.ipv4.ip_forward = 1`, written only when it is not already.
fn enable_ip_forward() -> Result<(), NetworkError> {
    let current =
        std::fs::read_to_string(IP_FORWARD).map_err(|e| NetworkError::kernel(format!("read {IP_FORWARD}"), e))?;
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1")
        .map_err(|e| NetworkError::kernel(format!("enable IPv4 forwarding ({IP_FORWARD})"), e))
}

/// File in an instance's bundle that tells its shim to plug the network after `build()`: the
/// container makes its own network namespace (it has a user namespace of its own, see
/// `spec::InstanceSpec::userns`).
pub const SANDBOX_PLAN_FILE: &str = "sandbox.json";

/// How to plug a container that made its own network namespace: which host network, where to
/// bind the namespace, which veth and address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxPlan {
    pub network: NetworkConfig,
    pub ns_path: std::path::PathBuf,
    pub veth: String,
    pub ip: Ipv4Addr,
}

impl SandboxPlan {
    /// Writes the plan into `bundle`.
    pub fn save(&self, bundle: &Path) -> Result<(), String> {
        let path = bundle.join(SANDBOX_PLAN_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The plan in `bundle`, if there is one.
    pub fn load(bundle: &Path) -> Result<Option<SandboxPlan>, String> {
        let path = bundle.join(SANDBOX_PLAN_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Plugs the network namespace of process `pid` as the plan says.
    pub fn apply(&self, pid: i32) -> Result<(), NetworkError> {
        let net = HostNetwork::new(self.network.clone())?;
        let source = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
        net.adopt_sandbox(&self.ns_path, &source, &self.veth, self.ip)
    }
}
