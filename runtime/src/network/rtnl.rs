//! rtnetlink requests (links, addresses, routes) over one NETLINK_ROUTE socket. The socket acts
//! in the network namespace it was opened in, so the same code configures the host and a sandbox.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use super::netlink::{NetlinkFailure, NetlinkSocket, NLM_F_ACK, NLM_F_REQUEST};

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Link {
    pub index: u32,
    pub kind: Option<InfoKind>,
    pub up: bool,
}

pub(super) struct Rtnl {
    socket: NetlinkSocket,
}

impl Rtnl {
    /// Opens a socket in the calling thread's network namespace.
    pub(super) fn open() -> Result<Self, NetlinkFailure> {
        Ok(Rtnl { socket: NetlinkSocket::open(NETLINK_ROUTE)? })
    }

    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkFailure> {
        let sequence = self.socket.reserve_sequences(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let replies = self.socket.transact(&bytes, sequence)?;
        replies
            .iter()
            .map(|reply| {
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(reply)
                    .map_err(|e| NetlinkFailure::Malformed(e.to_string()))?;
                match parsed.payload {
                    NetlinkPayload::InnerMessage(inner) => Ok(inner),
                    other => Err(NetlinkFailure::Malformed(format!("expected an rtnetlink message, got {other:?}"))),
                }
            })
            .collect()
    }

    /// A change request: acked, nothing returned.
    fn change(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkFailure> {
        self.request(message, NLM_F_ACK | flags).map(|_| ())
    }

    /// Looks a link up by name; `None` if there is none.
    pub(super) fn link(&mut self, name: &str) -> Result<Option<Link>, NetlinkFailure> {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.to_string()));
        let replies = match self.request(RouteNetlinkMessage::GetLink(message), NLM_F_ACK) {
            Ok(replies) => replies,
            Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        for reply in replies {
            if let RouteNetlinkMessage::NewLink(link) = reply {
                let kind = link.attributes.iter().find_map(|attribute| match attribute {
                    LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                        LinkInfo::Kind(kind) => Some(kind.clone()),
                        _ => None,
                    }),
                    _ => None,
                });
                return Ok(Some(Link {
                    index: link.header.index,
                    kind,
                    up: link.header.flags.contains(LinkFlags::Up),
                }));
            }
        }
        Err(NetlinkFailure::Malformed(format!("no link in the answer to a lookup of {name:?}")))
    }

    pub(super) fn add_bridge(&mut self, name: &str) -> Result<(), NetlinkFailure> {
        let mut message = LinkMessage::default();
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message.attributes.push(LinkAttribute::IfName(name.to_string()));
        message.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.change(RouteNetlinkMessage::NewLink(message), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Creates a veth pair: `host_name` here, enslaved to `master`, up; its peer `peer_name`
    /// directly inside the namespace `peer_netns`, down.
    pub(super) fn add_veth(
        &mut self,
        host_name: &str,
        master: u32,
        peer_name: &str,
        peer_mac: [u8; 6],
        peer_netns: RawFd,
    ) -> Result<(), NetlinkFailure> {
        // The peer cannot be created up: veth_open() fails with ENOTCONN until both ends are
        // registered, so the caller sets it up afterwards, from inside the namespace.
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Address(peer_mac.to_vec()));
        peer.attributes.push(LinkAttribute::NetNsFd(peer_netns));

        let mut message = LinkMessage::default();
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message.attributes.push(LinkAttribute::IfName(host_name.to_string()));
        message.attributes.push(LinkAttribute::Controller(master));
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.change(RouteNetlinkMessage::NewLink(message), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Sets a link's hardware address; setting the one it has is a no-op.
    pub(super) fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkFailure> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.change(RouteNetlinkMessage::SetLink(message), 0)
    }

    pub(super) fn set_up(&mut self, index: u32) -> Result<(), NetlinkFailure> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        self.change(RouteNetlinkMessage::SetLink(message), 0)
    }

    /// Deletes a link by name; `false` if there was none.
    pub(super) fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkFailure> {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.change(RouteNetlinkMessage::DelLink(message), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The IPv4 addresses (address, prefix length) of link `index`.
    pub(super) fn ipv4_addresses(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkFailure> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.index = index;
        let replies = self.request(RouteNetlinkMessage::GetAddress(message), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewAddress(address) if address.header.index == index => {
                    address.attributes.iter().find_map(|attribute| match attribute {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, address.header.prefix_len)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    fn address_message(index: u32, ip: Ipv4Addr, prefix_len: u8, broadcast: Option<Ipv4Addr>) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix_len;
        message.header.index = index;
        message.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
        message.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
        if let Some(broadcast) = broadcast {
            message.attributes.push(AddressAttribute::Broadcast(broadcast));
        }
        message
    }

    /// Adds (or refreshes) an address; idempotent.
    pub(super) fn add_address(
        &mut self,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
        broadcast: Ipv4Addr,
    ) -> Result<(), NetlinkFailure> {
        let message = Self::address_message(index, ip, prefix_len, Some(broadcast));
        self.change(RouteNetlinkMessage::NewAddress(message), NLM_F_CREATE | NLM_F_REPLACE)
    }

    pub(super) fn delete_address(&mut self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkFailure> {
        let message = Self::address_message(index, ip, prefix_len, None);
        self.change(RouteNetlinkMessage::DelAddress(message), 0)
    }

    /// `default via <gateway> dev <index>` in the main table; idempotent.
    pub(super) fn replace_default_route(&mut self, gateway: Ipv4Addr, index: u32) -> Result<(), NetlinkFailure> {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        message.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        message.attributes.push(RouteAttribute::Oif(index));
        self.change(RouteNetlinkMessage::NewRoute(message), NLM_F_CREATE | NLM_F_REPLACE)
    }
}
