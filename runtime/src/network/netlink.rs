//! Netlink transport shared by rtnetlink and nf_tables: one socket, sequence numbers, splitting
//! datagrams into messages, and turning NLMSG_ERROR (with its extended-ack text) into errors.

use std::io;

use netlink_sys::{Socket, SocketAddr};

use super::NetworkError;

pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 0x01;
pub(super) const NLM_F_ACK: u16 = 0x04;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Largest datagram we accept; dumps of a few links/addresses fit easily.
const RECV_BUFFER: usize = 64 * 1024;

/// A transport failure, before it is given the operation's name.
#[derive(Debug)]
pub(super) enum NetlinkFailure {
    /// A syscall on the socket failed.
    Io(io::Error),
    /// The kernel answered NLMSG_ERROR with a negative errno.
    Nack { errno: i32, message: Option<String> },
    /// The reply could not be decoded.
    Malformed(String),
}

impl NetlinkFailure {
    pub(super) fn errno(&self) -> Option<i32> {
        match self {
            NetlinkFailure::Io(e) => e.raw_os_error(),
            NetlinkFailure::Nack { errno, .. } => Some(*errno),
            NetlinkFailure::Malformed(_) => None,
        }
    }

    pub(super) fn during(self, operation: impl Into<String>) -> NetworkError {
        let operation = operation.into();
        match self {
            NetlinkFailure::Io(errno) => NetworkError::Kernel { operation, errno, kernel_message: None },
            NetlinkFailure::Nack { errno, message } => {
                NetworkError::Kernel { operation, errno: io::Error::from_raw_os_error(errno), kernel_message: message }
            }
            NetlinkFailure::Malformed(reason) => NetworkError::Protocol { operation, reason },
        }
    }
}

/// One raw netlink message inside a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawMessage<'a> {
    pub message_type: u16,
    pub flags: u16,
    pub sequence: u32,
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

impl RawMessage<'_> {
    /// For NLMSG_ERROR: `Ok(())` for an ack, the errno and extended-ack text for a nack.
    pub(super) fn ack_result(&self) -> Result<(), NetlinkFailure> {
        let code = read_u32(self.bytes, NLMSG_HDRLEN)
            .map(|raw| i32::from_ne_bytes(raw.to_ne_bytes()))
            .ok_or_else(|| NetlinkFailure::Malformed("truncated NLMSG_ERROR".into()))?;
        if code == 0 {
            return Ok(());
        }
        Err(NetlinkFailure::Nack { errno: code.saturating_neg(), message: self.extended_ack_message() })
    }

    fn extended_ack_message(&self) -> Option<String> {
        if self.flags & NLM_F_ACK_TLVS == 0 {
            return None;
        }
        // nlmsgerr = error code + the original header (+ its payload unless capped), then TLVs.
        let original = NLMSG_HDRLEN + 4;
        let original_len =
            if self.flags & NLM_F_CAPPED != 0 { NLMSG_HDRLEN } else { read_u32(self.bytes, original)? as usize };
        let mut offset = original + align4(original_len);
        while offset + 4 <= self.bytes.len() {
            let len = read_u16(self.bytes, offset)? as usize;
            let kind = read_u16(self.bytes, offset + 2)? & NLA_TYPE_MASK;
            if len < 4 || offset + len > self.bytes.len() {
                return None;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let value = &self.bytes[offset + 4..offset + len];
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                return Some(String::from_utf8_lossy(text).into_owned());
            }
            offset += align4(len);
        }
        None
    }
}

pub(super) fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let raw = bytes.get(offset..offset + 2)?;
    Some(u16::from_ne_bytes([raw[0], raw[1]]))
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let raw = bytes.get(offset..offset + 4)?;
    Some(u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

/// Split a datagram into its netlink messages.
pub(super) fn split_messages(datagram: &[u8]) -> Result<Vec<RawMessage<'_>>, NetlinkFailure> {
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset + NLMSG_HDRLEN <= datagram.len() {
        let malformed = || NetlinkFailure::Malformed(format!("bad message header at byte {offset}"));
        let len = read_u32(datagram, offset).ok_or_else(malformed)? as usize;
        if len < NLMSG_HDRLEN || offset + len > datagram.len() {
            return Err(malformed());
        }
        messages.push(RawMessage {
            message_type: read_u16(datagram, offset + 4).ok_or_else(malformed)?,
            flags: read_u16(datagram, offset + 6).ok_or_else(malformed)?,
            sequence: read_u32(datagram, offset + 8).ok_or_else(malformed)?,
            bytes: &datagram[offset..offset + len],
        });
        offset += align4(len);
    }
    Ok(messages)
}

/// A connected netlink socket of one protocol, in the network namespace of the thread that
/// opened it (the socket stays bound to that namespace whichever thread uses it later).
pub(super) struct NetlinkSocket {
    socket: Socket,
    next_sequence: u32,
    buffer: Vec<u8>,
}

impl NetlinkSocket {
    pub(super) fn open(protocol: isize) -> Result<Self, NetlinkFailure> {
        let mut socket = Socket::new(protocol).map_err(NetlinkFailure::Io)?;
        // Extended acks only improve error messages; kernels without them still work.
        let _ = socket.set_ext_ack(true);
        socket.bind_auto().map_err(NetlinkFailure::Io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(NetlinkFailure::Io)?;
        Ok(NetlinkSocket { socket, next_sequence: 1, buffer: Vec::with_capacity(RECV_BUFFER) })
    }

    /// Reserve `count` consecutive sequence numbers and return the first.
    pub(super) fn reserve_sequences(&mut self, count: u32) -> u32 {
        let first = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(count);
        first
    }

    pub(super) fn send(&self, bytes: &[u8]) -> Result<(), NetlinkFailure> {
        let sent = self.socket.send(bytes, 0).map_err(NetlinkFailure::Io)?;
        if sent != bytes.len() {
            return Err(NetlinkFailure::Malformed(format!("short send: {sent} of {} bytes", bytes.len())));
        }
        Ok(())
    }

    /// Receive one datagram; `None` when `nonblocking` and nothing is queued.
    pub(super) fn receive(&mut self, nonblocking: bool) -> Result<Option<&[u8]>, NetlinkFailure> {
        self.buffer.clear();
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let len = loop {
            match self.socket.recv(&mut self.buffer, flags) {
                Ok(len) => break len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if nonblocking && e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(NetlinkFailure::Io(e)),
            }
        };
        if len > self.buffer.len() {
            return Err(NetlinkFailure::Malformed(format!(
                "datagram of {len} bytes exceeds the {RECV_BUFFER}-byte buffer"
            )));
        }
        Ok(Some(&self.buffer[..len]))
    }

    /// Send one request (already carrying `sequence` and NLM_F_ACK, or NLM_F_DUMP) and collect
    /// the payload messages of its answer, until the ack or NLMSG_DONE.
    pub(super) fn transact(&mut self, request: &[u8], sequence: u32) -> Result<Vec<Vec<u8>>, NetlinkFailure> {
        self.send(request)?;
        let mut replies = Vec::new();
        loop {
            let Some(datagram) = self.receive(false)? else {
                continue;
            };
            for message in split_messages(datagram)? {
                if message.sequence != sequence {
                    continue;
                }
                match message.message_type {
                    NLMSG_ERROR => {
                        message.ack_result()?;
                        return Ok(replies);
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(message.bytes.to_vec()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out
    }

    #[test]
    fn splits_datagram_into_aligned_messages() {
        let mut datagram = header(17, 100, 0, 7);
        datagram.extend_from_slice(&[1, 0, 0, 0]); // 1 payload byte + 3 padding
        datagram.extend(header(16, NLMSG_DONE, 0, 7));
        let messages = split_messages(&datagram).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].message_type, 100);
        assert_eq!(messages[0].bytes.len(), 17);
        assert_eq!(messages[1].message_type, NLMSG_DONE);
        assert_eq!(messages[1].sequence, 7);
    }

    #[test]
    fn rejects_length_past_end() {
        let datagram = header(64, 100, 0, 1);
        assert!(matches!(split_messages(&datagram), Err(NetlinkFailure::Malformed(_))));
    }

    #[test]
    fn ack_and_nack_with_extended_message() {
        let mut ack = header(36, NLMSG_ERROR, 0, 3);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend(header(16, 16, 5, 3));
        let parsed = split_messages(&ack).unwrap();
        assert!(parsed[0].ack_result().is_ok());

        let text = b"Device does not exist\0";
        let attr_len = 4 + text.len();
        let total = 36 + align4(attr_len);
        let mut nack = header(total as u32, NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 3);
        nack.extend_from_slice(&(-19i32).to_ne_bytes());
        nack.extend(header(40, 16, 5, 3));
        nack.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        nack.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        nack.extend_from_slice(text);
        nack.resize(total, 0);
        let parsed = split_messages(&nack).unwrap();
        match parsed[0].ack_result() {
            Err(NetlinkFailure::Nack { errno, message }) => {
                assert_eq!(errno, 19);
                assert_eq!(message.as_deref(), Some("Device does not exist"));
            }
            other => panic!("expected a nack, got {other:?}"),
        }
        let error = parsed[0].ack_result().unwrap_err().during("delete link \"x\"");
        let shown = error.to_string();
        assert!(shown.starts_with("delete link \"x\": "), "{shown}");
        assert!(shown.contains("os error 19"), "{shown}");
        assert!(shown.contains("kernel: Device does not exist"), "{shown}");
    }
}
