//! The nf_tables `ip <table>` holding the instances' masquerade rule: the batch messages are
//! encoded here by hand (nfgenmsg + attributes, see <linux/netfilter/nf_tables.h>) and sent over
//! NETLINK_NETFILTER as one transaction, so the table is replaced or removed atomically.

use netlink_sys::protocols::NETLINK_NETFILTER;

use super::netlink::{align4, split_messages, NetlinkSocket, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_ACK, NLM_F_REQUEST};
use super::{Ipv4Net, NetworkError};

// <linux/netfilter/nfnetlink.h>
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNETLINK_V0: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const AF_UNSPEC: u8 = 0;

// <linux/netfilter/nf_tables.h>
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_ACCEPT: u32 = 1;
const NF_IP_PRI_NAT_SRC: i32 = 100;
const IFNAMSIZ: usize = 16;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
/// Offset of the source address in the IPv4 header.
const IPV4_SADDR_OFFSET: u32 = 12;

pub(super) const CHAIN: &str = "postrouting";

/// What the table must contain: masquerade traffic from `subnet` leaving by any other
/// interface than `bridge`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MasqueradeTable<'a> {
    pub table: &'a str,
    pub subnet: Ipv4Net,
    pub bridge: &'a str,
}

/// Attribute writer: type-length-value, 4-byte aligned; nf_tables integers are big-endian.
#[derive(Default)]
struct Attributes {
    bytes: Vec<u8>,
}

impl Attributes {
    fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        // Values here are at most a few hundred bytes, far below u16::MAX.
        self.bytes.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(align4(self.bytes.len()), 0);
        self
    }

    fn string(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut nul_terminated = value.as_bytes().to_vec();
        nul_terminated.push(0);
        self.put(kind, &nul_terminated)
    }

    fn u32_be(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put(kind, &value.to_be_bytes())
    }

    fn nested(&mut self, kind: u16, build: impl FnOnce(&mut Attributes)) -> &mut Self {
        let mut inner = Attributes::default();
        build(&mut inner);
        self.put(kind | NLA_F_NESTED, &inner.bytes)
    }

    /// An expression: `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { .. } }`.
    fn expression(&mut self, name: &str, data: impl FnOnce(&mut Attributes)) -> &mut Self {
        self.nested(NFTA_LIST_ELEM, |elem| {
            elem.string(NFTA_EXPR_NAME, name);
            elem.nested(NFTA_EXPR_DATA, data);
        })
    }
}

/// One message of a batch, with what it does (for error messages).
struct BatchMessage {
    message_type: u16,
    flags: u16,
    family: u8,
    attributes: Vec<u8>,
    what: String,
}

/// An encoded nfnetlink batch and, per sequence number, what each message does.
struct Batch {
    bytes: Vec<u8>,
    first_sequence: u32,
    descriptions: Vec<String>,
}

impl Batch {
    fn describe(&self, sequence: u32) -> &str {
        sequence
            .checked_sub(self.first_sequence)
            .and_then(|i| self.descriptions.get(i as usize))
            .map_or("nf_tables batch", String::as_str)
    }
}

fn encode_message(
    out: &mut Vec<u8>,
    message_type: u16,
    flags: u16,
    sequence: u32,
    family: u8,
    resource: u16,
    attributes: &[u8],
) {
    let len = NLMSG_HDRLEN + 4 + attributes.len();
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(&message_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&sequence.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg { nfgen_family, version, res_id (big-endian) }
    out.push(family);
    out.push(NFNETLINK_V0);
    out.extend_from_slice(&resource.to_be_bytes());
    out.extend_from_slice(attributes);
    out.resize(align4(out.len()), 0);
}

/// Wrap `messages` between BATCH_BEGIN and BATCH_END; every message asks for an ack.
fn encode_batch(messages: Vec<BatchMessage>, first_sequence: u32) -> Batch {
    let mut bytes = Vec::new();
    let mut sequence = first_sequence;
    encode_message(&mut bytes, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, sequence, AF_UNSPEC, NFNL_SUBSYS_NFTABLES, &[]);
    let mut descriptions = vec!["begin nf_tables batch".to_string()];
    for message in messages {
        sequence = sequence.wrapping_add(1);
        encode_message(
            &mut bytes,
            (NFNL_SUBSYS_NFTABLES << 8) | message.message_type,
            NLM_F_REQUEST | NLM_F_ACK | message.flags,
            sequence,
            message.family,
            0,
            &message.attributes,
        );
        descriptions.push(message.what);
    }
    sequence = sequence.wrapping_add(1);
    encode_message(&mut bytes, NFNL_MSG_BATCH_END, NLM_F_REQUEST, sequence, AF_UNSPEC, NFNL_SUBSYS_NFTABLES, &[]);
    descriptions.push("end nf_tables batch".to_string());
    Batch { bytes, first_sequence, descriptions }
}

/// Number of sequence numbers a batch of `messages` uses (begin + messages + end).
fn batch_len(messages: &[BatchMessage]) -> u32 {
    u32::try_from(messages.len()).unwrap_or(u32::MAX).saturating_add(2)
}

fn table_message(kind: u16, table: &str) -> BatchMessage {
    let mut attributes = Attributes::default();
    attributes.string(NFTA_TABLE_NAME, table);
    let (flags, what) = if kind == NFT_MSG_NEWTABLE {
        attributes.u32_be(NFTA_TABLE_FLAGS, 0);
        (NLM_F_CREATE, format!("create nft table ip {table}"))
    } else {
        (0, format!("delete nft table ip {table}"))
    };
    BatchMessage { message_type: kind, flags, family: NFPROTO_IPV4, attributes: attributes.bytes, what }
}

/// "Create if missing, then delete": removes the table whether or not it exists, without error.
fn remove_table_messages(table: &str) -> Vec<BatchMessage> {
    vec![table_message(NFT_MSG_NEWTABLE, table), table_message(NFT_MSG_DELTABLE, table)]
}

fn chain_message(table: &str) -> BatchMessage {
    let mut attributes = Attributes::default();
    attributes
        .string(NFTA_CHAIN_TABLE, table)
        .string(NFTA_CHAIN_NAME, CHAIN)
        .nested(NFTA_CHAIN_HOOK, |hook| {
            hook.u32_be(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING)
                .put(NFTA_HOOK_PRIORITY, &NF_IP_PRI_NAT_SRC.to_be_bytes());
        })
        .u32_be(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .string(NFTA_CHAIN_TYPE, "nat");
    BatchMessage {
        message_type: NFT_MSG_NEWCHAIN,
        flags: NLM_F_CREATE,
        family: NFPROTO_IPV4,
        attributes: attributes.bytes,
        what: format!("create nft chain ip {table} {CHAIN} (nat, postrouting, srcnat)"),
    }
}

/// `ip saddr <subnet> oifname != <bridge> masquerade`
fn masquerade_rule_message(spec: &MasqueradeTable<'_>) -> BatchMessage {
    let prefix = spec.subnet.prefix_len();
    let network = spec.subnet.network().octets();
    // Byte-aligned prefixes compare only the leading bytes (as nft does); others are masked.
    let (load_len, mask) =
        if prefix % 8 == 0 { (u32::from(prefix / 8), None) } else { (4, Some(spec.subnet.netmask().octets())) };
    let compared = &network[..load_len as usize];
    let mut oifname = [0u8; IFNAMSIZ];
    let name = spec.bridge.as_bytes();
    let copied = name.len().min(IFNAMSIZ - 1);
    oifname[..copied].copy_from_slice(&name[..copied]);

    let mut attributes = Attributes::default();
    attributes.string(NFTA_RULE_TABLE, spec.table).string(NFTA_RULE_CHAIN, CHAIN).nested(
        NFTA_RULE_EXPRESSIONS,
        |exprs| {
            exprs.expression("payload", |data| {
                data.u32_be(NFTA_PAYLOAD_DREG, NFT_REG_1)
                    .u32_be(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER)
                    .u32_be(NFTA_PAYLOAD_OFFSET, IPV4_SADDR_OFFSET)
                    .u32_be(NFTA_PAYLOAD_LEN, load_len);
            });
            if let Some(mask) = mask {
                exprs.expression("bitwise", |data| {
                    data.u32_be(NFTA_BITWISE_SREG, NFT_REG_1)
                        .u32_be(NFTA_BITWISE_DREG, NFT_REG_1)
                        .u32_be(NFTA_BITWISE_LEN, 4)
                        .nested(NFTA_BITWISE_MASK, |value| {
                            value.put(NFTA_DATA_VALUE, &mask);
                        })
                        .nested(NFTA_BITWISE_XOR, |value| {
                            value.put(NFTA_DATA_VALUE, &[0; 4]);
                        });
                });
            }
            if load_len > 0 {
                exprs.expression("cmp", |data| {
                    data.u32_be(NFTA_CMP_SREG, NFT_REG_1).u32_be(NFTA_CMP_OP, NFT_CMP_EQ).nested(
                        NFTA_CMP_DATA,
                        |value| {
                            value.put(NFTA_DATA_VALUE, compared);
                        },
                    );
                });
            }
            exprs.expression("meta", |data| {
                data.u32_be(NFTA_META_KEY, NFT_META_OIFNAME).u32_be(NFTA_META_DREG, NFT_REG_1);
            });
            exprs.expression("cmp", |data| {
                data.u32_be(NFTA_CMP_SREG, NFT_REG_1).u32_be(NFTA_CMP_OP, NFT_CMP_NEQ).nested(NFTA_CMP_DATA, |value| {
                    value.put(NFTA_DATA_VALUE, &oifname);
                });
            });
            exprs.nested(NFTA_LIST_ELEM, |elem| {
                elem.string(NFTA_EXPR_NAME, "masq");
            });
        },
    );
    BatchMessage {
        message_type: NFT_MSG_NEWRULE,
        flags: NLM_F_CREATE | NLM_F_APPEND,
        family: NFPROTO_IPV4,
        attributes: attributes.bytes,
        what: format!(
            "add nft rule to ip {} {CHAIN}: ip saddr {} oifname != {:?} masquerade",
            spec.table, spec.subnet, spec.bridge
        ),
    }
}

/// Replace the table (whether it exists or not) by the masquerade table, atomically.
fn replace_messages(spec: &MasqueradeTable<'_>) -> Vec<BatchMessage> {
    let mut messages = remove_table_messages(spec.table);
    messages.push(table_message(NFT_MSG_NEWTABLE, spec.table));
    messages.push(chain_message(spec.table));
    messages.push(masquerade_rule_message(spec));
    messages
}

/// Send a batch and report its first failing message. nfnetlink processes a batch inside
/// `send()`, so every ack is queued by the time it returns: drain without blocking.
fn run_batch(messages: Vec<BatchMessage>, operation: &str) -> Result<(), NetworkError> {
    let mut socket = NetlinkSocket::open(NETLINK_NETFILTER)
        .map_err(|e| e.during(format!("{operation}: open NETLINK_NETFILTER socket")))?;
    let first_sequence = socket.reserve_sequences(batch_len(&messages));
    let batch = encode_batch(messages, first_sequence);
    socket.send(&batch.bytes).map_err(|e| e.during(format!("{operation}: send nf_tables batch")))?;
    let mut first_error: Option<NetworkError> = None;
    loop {
        let datagram = match socket.receive(true) {
            Ok(Some(datagram)) => datagram,
            Ok(None) => break,
            Err(e) => return Err(e.during(format!("{operation}: read nf_tables acks"))),
        };
        let messages = split_messages(datagram).map_err(|e| e.during(format!("{operation}: read nf_tables acks")))?;
        for message in messages {
            if message.message_type != NLMSG_ERROR || first_error.is_some() {
                continue;
            }
            if let Err(failure) = message.ack_result() {
                first_error = Some(failure.during(format!("{operation}: {}", batch.describe(message.sequence))));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

pub(super) fn replace_table(spec: &MasqueradeTable<'_>) -> Result<(), NetworkError> {
    run_batch(replace_messages(spec), &format!("replace nft table ip {}", spec.table))
}

pub(super) fn remove_table(table: &str) -> Result<(), NetworkError> {
    run_batch(remove_table_messages(table), &format!("delete nft table ip {table}"))
}

/// Decoding helpers for tests: walk what the encoder wrote.
#[cfg(test)]
mod tests {
    use super::*;

    /// (type without the nested flag, value) pairs of an attribute stream.
    fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while bytes.len() >= 4 {
            let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
            let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & !NLA_F_NESTED;
            assert!(len >= 4 && len <= bytes.len(), "bad attribute length {len}");
            out.push((kind, &bytes[4..len]));
            bytes = &bytes[align4(len).min(bytes.len())..];
        }
        assert!(bytes.is_empty(), "trailing bytes");
        out
    }

    fn find<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> &'a [u8] {
        attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v).unwrap()
    }

    /// (message type, flags, sequence, nfgen family, res_id, attributes) per message.
    fn messages(batch: &[u8]) -> Vec<(u16, u16, u32, u8, u16, Vec<u8>)> {
        split_messages(batch)
            .unwrap()
            .into_iter()
            .map(|m| {
                let b = m.bytes;
                let res_id = u16::from_be_bytes([b[18], b[19]]);
                (m.message_type, m.flags, m.sequence, b[16], res_id, b[20..].to_vec())
            })
            .collect()
    }

    fn expressions(rule_attrs: &[u8]) -> Vec<(String, Vec<u8>)> {
        let attrs = attributes(rule_attrs);
        let list = find(&attrs, NFTA_RULE_EXPRESSIONS);
        attributes(list)
            .into_iter()
            .map(|(kind, elem)| {
                assert_eq!(kind, NFTA_LIST_ELEM);
                let elem = attributes(elem);
                let name = find(&elem, NFTA_EXPR_NAME);
                let name = String::from_utf8(name[..name.len() - 1].to_vec()).unwrap();
                let data = elem.iter().find(|(k, _)| *k == NFTA_EXPR_DATA).map(|(_, v)| v.to_vec()).unwrap_or_default();
                (name, data)
            })
            .collect()
    }

    fn spec(subnet: &str) -> (Ipv4Net, &'static str) {
        (subnet.parse().unwrap(), "dlvtab")
    }

    #[test]
    fn replace_batch_is_framed_and_sequenced() {
        let (subnet, bridge) = spec("10.231.5.0/24");
        let table = MasqueradeTable { table: "dlvt_ab", subnet, bridge };
        let batch = encode_batch(replace_messages(&table), 40);
        let msgs = messages(&batch.bytes);
        let types: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        let nft = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
        assert_eq!(
            types,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_DELTABLE),
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        let sequences: Vec<u32> = msgs.iter().map(|m| m.2).collect();
        assert_eq!(sequences, (40..47).collect::<Vec<_>>());
        assert_eq!(batch_len(&replace_messages(&table)), 7);
        // Begin/end address the nf_tables subsystem; the others the ip family, with acks.
        assert_eq!((msgs[0].3, msgs[0].4), (AF_UNSPEC, NFNL_SUBSYS_NFTABLES));
        assert_eq!((msgs[6].3, msgs[6].4), (AF_UNSPEC, NFNL_SUBSYS_NFTABLES));
        for m in &msgs[1..6] {
            assert_eq!(m.3, NFPROTO_IPV4);
            assert_ne!(m.1 & NLM_F_ACK, 0);
        }
        assert_eq!(find(&attributes(&msgs[1].5), NFTA_TABLE_NAME), b"dlvt_ab\0");
        assert_eq!(
            batch.describe(45),
            "add nft rule to ip dlvt_ab postrouting: ip saddr 10.231.5.0/24 oifname != \"dlvtab\" masquerade"
        );
    }

    #[test]
    fn chain_is_a_nat_postrouting_base_chain() {
        let msg = chain_message("dlvt_ab");
        let attrs = attributes(&msg.attributes);
        assert_eq!(find(&attrs, NFTA_CHAIN_NAME), b"postrouting\0");
        assert_eq!(find(&attrs, NFTA_CHAIN_TYPE), b"nat\0");
        let hook = attributes(find(&attrs, NFTA_CHAIN_HOOK));
        assert_eq!(find(&hook, NFTA_HOOK_HOOKNUM), &4u32.to_be_bytes());
        assert_eq!(find(&hook, NFTA_HOOK_PRIORITY), &100i32.to_be_bytes());
    }

    #[test]
    fn rule_for_byte_aligned_prefix_matches_nft() {
        // `nft --debug=netlink` for `ip saddr 10.231.5.0/24 oifname != "dlvtab" masquerade`:
        //   payload load 3b @ network header + 12 => reg 1; cmp eq reg 1 0x0005e70a;
        //   meta load oifname => reg 1; cmp neq reg 1 0x74766c64 0x00006261 0 0; masq
        let (subnet, bridge) = spec("10.231.5.0/24");
        let msg = masquerade_rule_message(&MasqueradeTable { table: "t", subnet, bridge });
        let exprs = expressions(&msg.attributes);
        let names: Vec<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["payload", "cmp", "meta", "cmp", "masq"]);
        let payload = attributes(&exprs[0].1);
        assert_eq!(find(&payload, NFTA_PAYLOAD_LEN), &3u32.to_be_bytes());
        assert_eq!(find(&payload, NFTA_PAYLOAD_OFFSET), &12u32.to_be_bytes());
        let cmp = attributes(&exprs[1].1);
        assert_eq!(find(&attributes(find(&cmp, NFTA_CMP_DATA)), NFTA_DATA_VALUE), &[10, 231, 5]);
        let meta = attributes(&exprs[2].1);
        assert_eq!(find(&meta, NFTA_META_KEY), &7u32.to_be_bytes());
        let neq = attributes(&exprs[3].1);
        assert_eq!(find(&neq, NFTA_CMP_OP), &NFT_CMP_NEQ.to_be_bytes());
        let name = find(&attributes(find(&neq, NFTA_CMP_DATA)), NFTA_DATA_VALUE);
        assert_eq!(name, b"dlvtab\0\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn rule_for_unaligned_prefix_masks_the_address() {
        let (subnet, bridge) = spec("10.88.0.0/13");
        let msg = masquerade_rule_message(&MasqueradeTable { table: "t", subnet, bridge });
        let exprs = expressions(&msg.attributes);
        let names: Vec<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["payload", "bitwise", "cmp", "meta", "cmp", "masq"]);
        let bitwise = attributes(&exprs[1].1);
        let mask = find(&attributes(find(&bitwise, NFTA_BITWISE_MASK)), NFTA_DATA_VALUE);
        assert_eq!(mask, &[255, 248, 0, 0]);
        let cmp = attributes(&exprs[2].1);
        assert_eq!(find(&attributes(find(&cmp, NFTA_CMP_DATA)), NFTA_DATA_VALUE), &[10, 88, 0, 0]);
    }

    #[test]
    fn remove_batch_creates_then_deletes() {
        let batch = encode_batch(remove_table_messages("dlvt_ab"), 1);
        let msgs = messages(&batch.bytes);
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[1].0 & 0xff, NFT_MSG_NEWTABLE);
        assert_eq!(msgs[2].0 & 0xff, NFT_MSG_DELTABLE);
        assert_eq!(find(&attributes(&msgs[2].5), NFTA_TABLE_NAME), b"dlvt_ab\0");
    }
}
