//! The WebSocket side of `GET /ws` (RFC 6455): the handshake's accept key, and an echo loop that
//! returns each data frame as it arrives, so a message of any size passes in constant memory and
//! fragmented messages come back fragmented the same way.
//!
//! Text payloads are echoed without UTF-8 validation: the app checks what a proxy does with the
//! frames, not what the client puts in them.

use std::io::{self, Read, Write};

use crate::digest::{base64, sha1};

/// Appended to the client's key before hashing (RFC 6455 §1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// Close codes (RFC 6455 §7.4.1).
const PROTOCOL_ERROR: u16 = 1002;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{}{GUID}", key.trim()).as_bytes()))
}

/// A frame header (RFC 6455 §5.2); the payload follows it on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    /// The three reserved bits (no extension is negotiated, so they must be 0).
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
}

/// Reads a frame header; `Ok(None)` if the connection ended cleanly before one.
pub fn read_frame_head<R: Read>(r: &mut R) -> io::Result<Option<FrameHead>> {
    let mut first = [0u8; 1];
    loop {
        match r.read(&mut first) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut second = [0u8; 1];
    r.read_exact(&mut second)?;
    let (b0, b1) = (first[0], second[0]);
    let len = match b1 & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            r.read_exact(&mut ext)?;
            u64::from(u16::from_be_bytes(ext))
        }
        127 => {
            let mut ext = [0u8; 8];
            r.read_exact(&mut ext)?;
            u64::from_be_bytes(ext)
        }
        short => u64::from(short),
    };
    let mask = if b1 & 0x80 != 0 {
        let mut key = [0u8; 4];
        r.read_exact(&mut key)?;
        Some(key)
    } else {
        None
    };
    Ok(Some(FrameHead { fin: b0 & 0x80 != 0, rsv: (b0 >> 4) & 0x7, opcode: b0 & 0x0f, mask, len }))
}

/// Writes an unmasked (server) frame header with the shortest length encoding.
pub fn write_frame_head<W: Write>(w: &mut W, fin: bool, opcode: u8, len: u64) -> io::Result<()> {
    let b0 = if fin { 0x80 } else { 0 } | (opcode & 0x0f);
    match len {
        0..=125 => w.write_all(&[b0, len as u8]),
        126..=0xffff => {
            w.write_all(&[b0, 126])?;
            w.write_all(&(len as u16).to_be_bytes())
        }
        _ => {
            w.write_all(&[b0, 127])?;
            w.write_all(&len.to_be_bytes())
        }
    }
}

/// XORs `data` with `mask`, `data` starting at byte `offset` of the payload (RFC 6455 §5.3).
pub fn unmask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[((offset + i as u64) % 4) as usize];
    }
}

/// Echoes frames from `r` to `w` until the client closes: data frames come back unmasked with
/// the same opcode and FIN bit, a ping gets a pong, a close gets a close with the same code.
/// Violations end it with a close 1002. `Err` only when the connection itself fails.
pub fn echo<R: Read, W: Write>(r: &mut R, w: &mut W) -> io::Result<()> {
    let mut in_message = false;
    let mut buf = [0u8; 8192];
    loop {
        let Some(frame) = read_frame_head(r)? else {
            return Ok(());
        };
        let Some(mask) = frame.mask else {
            return close(w, PROTOCOL_ERROR, "client frames must be masked");
        };
        if frame.rsv != 0 {
            return close(w, PROTOCOL_ERROR, "no extension was negotiated: RSV bits must be 0");
        }
        if frame.len >> 63 != 0 {
            return close(w, PROTOCOL_ERROR, "64-bit payload length with the high bit set");
        }
        let control = frame.opcode & 0x8 != 0;
        if control && (!frame.fin || frame.len > 125) {
            return close(w, PROTOCOL_ERROR, "control frames must be final and at most 125 bytes");
        }
        match frame.opcode {
            CONTINUATION | TEXT | BINARY => {
                if in_message != (frame.opcode == CONTINUATION) {
                    let why = if in_message { "expected a continuation frame" } else { "continuation of nothing" };
                    return close(w, PROTOCOL_ERROR, why);
                }
                write_frame_head(w, frame.fin, frame.opcode, frame.len)?;
                let mut offset = 0;
                while offset < frame.len {
                    let want = usize::try_from(frame.len - offset).unwrap_or(usize::MAX).min(buf.len());
                    r.read_exact(&mut buf[..want])?;
                    unmask(&mut buf[..want], mask, offset);
                    w.write_all(&buf[..want])?;
                    offset += want as u64;
                }
                w.flush()?;
                in_message = !frame.fin;
            }
            PING | PONG | CLOSE => {
                let payload = &mut buf[..frame.len as usize];
                r.read_exact(payload)?;
                unmask(payload, mask, 0);
                match frame.opcode {
                    PING => {
                        write_frame_head(w, true, PONG, frame.len)?;
                        w.write_all(payload)?;
                        w.flush()?;
                    }
                    PONG => {}
                    _ => return close_reply(w, payload),
                }
            }
            _ => return close(w, PROTOCOL_ERROR, "unknown opcode"),
        }
    }
}

/// Answers a close frame: with the same code if it carried a valid one, empty if it had none.
fn close_reply<W: Write>(w: &mut W, payload: &[u8]) -> io::Result<()> {
    match payload {
        [] => {
            write_frame_head(w, true, CLOSE, 0)?;
            w.flush()
        }
        [hi, lo, ..] if sendable_code(u16::from_be_bytes([*hi, *lo])) => close(w, u16::from_be_bytes([*hi, *lo]), ""),
        _ => close(w, PROTOCOL_ERROR, "invalid close payload"),
    }
}

/// Codes an endpoint may put in a close frame (RFC 6455 §7.4).
fn sendable_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

fn close<W: Write>(w: &mut W, code: u16, reason: &str) -> io::Result<()> {
    write_frame_head(w, true, CLOSE, 2 + reason.len() as u64)?;
    w.write_all(&code.to_be_bytes())?;
    w.write_all(reason.as_bytes())?;
    w.flush()
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A client frame: masked with `mask`, as RFC 6455 requires.
    pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = Vec::new();
        write_frame_head(&mut frame, fin, opcode, payload.len() as u64).unwrap();
        frame[1] |= 0x80;
        frame.extend_from_slice(&mask);
        let mut masked = payload.to_vec();
        unmask(&mut masked, mask, 0);
        frame.extend_from_slice(&masked);
        frame
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        // RFC 6455 §1.3: the SHA-1 is b3 7a 4f 2c c0 62 4f 16 90 f6 46 06 cf 38 59 45 b2 be c4 ea.
        let digest = sha1(b"dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        assert_eq!(digest[..4], [0xb3, 0x7a, 0x4f, 0x2c]);
        assert_eq!(digest[16..], [0xb2, 0xbe, 0xc4, 0xea]);
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn frame_heads_decode_as_in_rfc_6455_section_5_7() {
        // A single-frame masked text message "Hello".
        let mut raw: &[u8] = &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let head = read_frame_head(&mut raw).unwrap().unwrap();
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        assert_eq!(head, FrameHead { fin: true, rsv: 0, opcode: TEXT, mask: Some(mask), len: 5 });
        let mut payload = raw.to_vec();
        unmask(&mut payload[..2], mask, 0);
        unmask(&mut payload[2..], mask, 2);
        assert_eq!(payload, b"Hello");

        // The start of a fragmented unmasked message, and 16- and 64-bit lengths.
        let head = read_frame_head(&mut &[0x01u8, 0x03][..]).unwrap().unwrap();
        assert_eq!((head.fin, head.opcode, head.mask, head.len), (false, TEXT, None, 3));
        let head = read_frame_head(&mut &[0x82u8, 0x7E, 0x01, 0x00][..]).unwrap().unwrap();
        assert_eq!((head.opcode, head.len), (BINARY, 256));
        let head = read_frame_head(&mut &[0x82u8, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0][..]).unwrap().unwrap();
        assert_eq!(head.len, 65536);

        assert!(read_frame_head(&mut &[][..]).unwrap().is_none());
        assert!(read_frame_head(&mut &[0x81u8, 0xfe, 0x01][..]).is_err(), "a truncated header is an error");
    }

    #[test]
    fn frame_heads_use_the_shortest_length() {
        for (len, size) in [(0u64, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            write_frame_head(&mut out, true, BINARY, len).unwrap();
            assert_eq!(out.len(), size, "{len}");
            assert_eq!(read_frame_head(&mut out.as_slice()).unwrap().unwrap().len, len);
        }
    }

    fn run_echo(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        echo(&mut &input[..], &mut out).unwrap();
        out
    }

    #[test]
    fn echo_returns_messages_answers_pings_and_closes() {
        let mask = [1, 2, 3, 4];
        let big = vec![7u8; 70_000];
        let mut input = client_frame(true, TEXT, b"Hello", mask);
        input.extend(client_frame(false, BINARY, b"frag-", mask));
        input.extend(client_frame(true, PING, b"mid", mask));
        input.extend(client_frame(true, CONTINUATION, b"ment", mask));
        input.extend(client_frame(true, BINARY, &big, mask));
        input.extend(client_frame(true, PONG, b"", mask));
        input.extend(client_frame(true, CLOSE, &1000u16.to_be_bytes(), mask));
        input.extend(client_frame(true, TEXT, b"after close: never read", mask));

        let mut expected = vec![0x81, 5];
        expected.extend(b"Hello");
        expected.extend([0x02, 5]);
        expected.extend(b"frag-");
        expected.extend([0x8A, 3]);
        expected.extend(b"mid");
        expected.extend([0x80, 4]);
        expected.extend(b"ment");
        expected.extend([0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        expected.extend(&big);
        expected.extend([0x88, 2, 0x03, 0xe8]);
        assert_eq!(run_echo(&input), expected);
    }

    #[test]
    fn protocol_violations_end_with_close_1002() {
        let mask = [9, 9, 9, 9];
        let violations = [
            vec![0x81, 0x02, b'h', b'i'],
            client_frame(true, CONTINUATION, b"x", mask),
            [client_frame(false, TEXT, b"a", mask), client_frame(true, TEXT, b"b", mask)].concat(),
            client_frame(false, PING, b"", mask),
            client_frame(true, PING, &[0; 126], mask),
            client_frame(true, 0x3, b"", mask),
            client_frame(true, CLOSE, &[0x03], mask),
            client_frame(true, CLOSE, &1005u16.to_be_bytes(), mask),
            [0xC1, 0x80, 0, 0, 0, 0].to_vec(),
            [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].to_vec(),
        ];
        for input in violations {
            let out = run_echo(&input);
            // The close frame ends the output (after any echo of frames before the violation).
            let close_at = (0..out.len().saturating_sub(1))
                .find(|&p| out[p] == 0x88 && p + 2 + out[p + 1] as usize == out.len())
                .unwrap_or_else(|| panic!("{input:?} -> {out:?}: no close frame at the end"));
            assert_eq!(&out[close_at + 2..close_at + 4], &1002u16.to_be_bytes(), "{input:?}");
        }
    }
}
