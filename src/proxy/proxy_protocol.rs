//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary), server side: reads the header a load
//! balancer puts in front of a connection to tell who the real client is, and consumes exactly that
//! header, so the HTTP request or TLS ClientHello after it reaches the next reader untouched.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;

/// What the PROXY header said about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHeader {
    /// v2 LOCAL command or v1 `UNKNOWN`: the connection is the sender's own (health check); use the socket's peer address.
    Local,
    /// The real client (`source`) and the address it connected to (`destination`).
    Proxied { source: SocketAddr, destination: SocketAddr },
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
    #[error(
        "expected a PROXY protocol header (v1 `PROXY ...` or the v2 signature), found {found}: \
         the sender is not configured to send one, or connects to the wrong port"
    )]
    NotProxyProtocol { found: String },
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol v2 header of {len} bytes is larger than the {max} bytes accepted")]
    TooLong { len: usize, max: usize },
    #[error("unsupported PROXY protocol header: {0}")]
    Unsupported(String),
    #[error("the peer closed the connection after {received} bytes, before a complete PROXY protocol header")]
    Closed { received: usize },
    #[error("no complete PROXY protocol header within {after:?} ({received} bytes received)")]
    Timeout { after: Duration, received: usize },
}

/// The longest v1 header, CRLF included (spec §2.1).
const V1_MAX_LEN: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, length.
const V2_FIXED_LEN: usize = 16;
/// The largest v2 header accepted, fixed part, addresses and TLVs together. The spec lets the length
/// field say 64 KiB; real senders (HAProxy, AWS NLB, GCP) stay far below, and the bound caps what one
/// connection can make us buffer before it has said anything useful.
pub const V2_MAX_LEN: usize = 4096;

/// Reads one PROXY header (v1 or v2, auto-detected) from the start of `stream`, consuming exactly the
/// header's bytes and nothing of what follows (the HTTP request or TLS ClientHello right after it
/// must remain unread). Gives up after `timeout`.
///
/// Nothing is consumed unless a complete, valid header was found: after a `NotProxyProtocol` error
/// the stream is as it was accepted.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<ProxyHeader, ProxyProtocolError> {
    let mut received = 0;
    match tokio::time::timeout(timeout, read_header_inner(stream, &mut received)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyProtocolError::Timeout { after: timeout, received }),
    }
}

async fn read_header_inner(stream: &mut TcpStream, received: &mut usize) -> Result<ProxyHeader, ProxyProtocolError> {
    // Peeking, not reading: bytes stay queued in the kernel until the header is known to be complete,
    // then exactly the header is read. The buffer starts large enough for any v1 line (a v2 header's
    // fixed part is shorter) and grows once a v2 length says more is needed.
    let mut buf = vec![0u8; V1_MAX_LEN];
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let fd = stream.as_raw_fd();
        let seen = *received;
        // A peek returns at once whenever anything is queued, so waiting for *more* bytes needs the
        // readiness cleared by hand: reporting WouldBlock when nothing new arrived does that, and
        // tokio keeps any readiness that a newer event set meanwhile, so no arrival is missed. Once
        // the peer has closed, its last bytes are all queued: no point waiting.
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = peek(fd, &mut buf)?;
            if n > seen || n == 0 || ready.is_read_closed() {
                Ok(n)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        });
        let n = match peeked {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        *received = n;
        match parse(&buf[..n])? {
            Parsed::Complete { header, len } => {
                // `len` <= `n` <= `buf.len()`; the bytes are queued already (they were just
                // peeked), so this returns at once.
                buf.truncate(len);
                stream.read_exact(&mut buf).await?;
                return Ok(header);
            }
            Parsed::Incomplete { want } => {
                if n == 0 || ready.is_read_closed() {
                    return Err(ProxyProtocolError::Closed { received: n });
                }
                if want > buf.len() {
                    buf.resize(want, 0);
                }
            }
        }
    }
}

/// `recv(MSG_PEEK)` without blocking; EINTR retried here so that it never reads as "no data".
fn peek(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match recv(fd, buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole header of `len` bytes is at the start of the buffer.
    Complete { header: ProxyHeader, len: usize },
    /// Valid so far; at least `want` bytes are needed to decide.
    Incomplete { want: usize },
}

/// Decides what the bytes at the start of a connection are. Pure, so that every rule is tested
/// without sockets; fails as early as the bytes allow, so garbage is refused without waiting.
fn parse(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete { want: 1 }),
        Some(b'\r') => parse_v2(buf),
        Some(b'P') => parse_v1(buf),
        Some(_) => Err(not_proxy_protocol(buf)),
    }
}

fn not_proxy_protocol(buf: &[u8]) -> ProxyProtocolError {
    let shown = &buf[..buf.len().min(16)];
    let text: String = shown.escape_ascii().to_string();
    ProxyProtocolError::NotProxyProtocol { found: format!("\"{text}\"") }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let prefix_len = buf.len().min(V1_PREFIX.len());
    if buf[..prefix_len] != V1_PREFIX[..prefix_len] {
        return Err(not_proxy_protocol(buf));
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => {
                if i + 2 > V1_MAX_LEN {
                    break;
                }
                let Some(&next) = buf.get(i + 1) else {
                    return Ok(Parsed::Incomplete { want: i + 2 });
                };
                if next != b'\n' {
                    return Err(ProxyProtocolError::Malformed("v1 line has a CR not followed by LF".into()));
                }
                let len = i + 2;
                let header = parse_v1_line(&buf[V1_PREFIX.len()..i])?;
                return Ok(Parsed::Complete { header, len });
            }
            b' '..=b'~' => {}
            other => {
                return Err(ProxyProtocolError::Malformed(format!(
                    "v1 line has the byte 0x{other:02x} at offset {i}; only printable ASCII is allowed"
                )))
            }
        }
    }
    if buf.len() >= V1_MAX_LEN {
        return Err(ProxyProtocolError::Malformed(format!("v1 line has no CRLF within {V1_MAX_LEN} bytes")));
    }
    Ok(Parsed::Incomplete { want: buf.len() + 1 })
}

/// `TCP4 192.0.2.1 198.51.100.2 56324 443` (what follows `PROXY `, CRLF excluded).
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, ProxyProtocolError> {
    let malformed = |what: String| ProxyProtocolError::Malformed(format!("v1: {what}"));
    // Printable ASCII was checked by the caller, so this cannot fail; no panic either way.
    let line = std::str::from_utf8(line).map_err(|_| malformed("not ASCII".into()))?;
    let mut fields = line.split(' ');
    let protocol = fields.next().unwrap_or_default();
    let v6 = match protocol {
        // The spec: the receiver must ignore anything between UNKNOWN and the CRLF.
        "UNKNOWN" => return Ok(ProxyHeader::Local),
        "TCP4" => false,
        "TCP6" => true,
        other => return Err(malformed(format!("protocol {other:?}, expected TCP4, TCP6 or UNKNOWN"))),
    };
    let fields: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(malformed(format!(
            "{protocol} needs 4 fields separated by single spaces (source, destination, source port, destination port), found {:?}",
            fields
        )));
    };
    let ip = |text: &str| -> Result<IpAddr, ProxyProtocolError> {
        if v6 {
            text.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| malformed(format!("{text:?} is not an IPv6 address")))
        } else {
            text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| malformed(format!("{text:?} is not an IPv4 address")))
        }
    };
    let source = SocketAddr::new(ip(src)?, parse_port(sport).ok_or_else(|| malformed(format!("bad port {sport:?}")))?);
    let destination =
        SocketAddr::new(ip(dst)?, parse_port(dport).ok_or_else(|| malformed(format!("bad port {dport:?}")))?);
    Ok(ProxyHeader::Proxied { source, destination })
}

/// Decimal 0–65535, digits only, no leading zero (`u16::from_str` would take `+80` and `080`).
fn parse_port(text: &str) -> Option<u16> {
    let digits_only = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let sig_len = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig_len] != V2_SIGNATURE[..sig_len] {
        return Err(not_proxy_protocol(buf));
    }
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::Incomplete { want: V2_FIXED_LEN });
    }
    let version = buf[12] >> 4;
    if version != 2 {
        return Err(ProxyProtocolError::Malformed(format!("v2 signature with version {version}, expected 2")));
    }
    let local = match buf[12] & 0x0f {
        0 => true,
        1 => false,
        other => {
            return Err(ProxyProtocolError::Malformed(format!("v2 command {other}, expected LOCAL (0) or PROXY (1)")))
        }
    };
    let family = buf[13];
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_LEN {
        return Err(ProxyProtocolError::TooLong { len, max: V2_MAX_LEN });
    }
    // The address block each family needs; decided before waiting for the rest, so a header that
    // cannot be valid is refused at once.
    enum Addresses {
        Local,
        V4,
        V6,
    }
    let (addresses, needed) = if local {
        // The spec: a LOCAL receiver ignores the family and the address block.
        (Addresses::Local, 0)
    } else {
        match family {
            0x00 => (Addresses::Local, 0),
            0x11 => (Addresses::V4, 12),
            0x21 => (Addresses::V6, 36),
            0x31 => (Addresses::Local, 216),
            0x12 | 0x22 | 0x32 => {
                return Err(ProxyProtocolError::Unsupported(format!(
                    "v2 family/protocol 0x{family:02x} describes a datagram flow; this listener takes TCP only"
                )))
            }
            other => {
                return Err(ProxyProtocolError::Malformed(format!("v2 family/protocol 0x{other:02x} is not defined")))
            }
        }
    };
    if len - V2_FIXED_LEN < needed {
        return Err(ProxyProtocolError::Malformed(format!(
            "v2 length {} is shorter than the {needed}-byte address block of family 0x{family:02x}",
            len - V2_FIXED_LEN
        )));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete { want: len });
    }
    // TLVs (after the addresses, up to `len`) are skipped: nothing here needs them.
    let a = &buf[V2_FIXED_LEN..len];
    let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
    let header = match addresses {
        Addresses::Local => ProxyHeader::Local,
        Addresses::V4 => {
            let ip = |at: usize| Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]);
            ProxyHeader::Proxied {
                source: SocketAddrV4::new(ip(0), port(8)).into(),
                destination: SocketAddrV4::new(ip(4), port(10)).into(),
            }
        }
        Addresses::V6 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            ProxyHeader::Proxied {
                source: SocketAddrV6::new(ip(0), port(32), 0, 0).into(),
                destination: SocketAddrV6::new(ip(16), port(34), 0, 0).into(),
            }
        }
    };
    Ok(Parsed::Complete { header, len })
}

/// Both addresses in one family: v4 when both are, else v6 with a v4 one mapped (`::ffff:a.b.c.d`).
#[cfg(test)]
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (source, destination),
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
                v6 => v6,
            };
            (v6(source), v6(destination))
        }
    }
}

/// A v1 header (`PROXY TCP4 ...\r\n`) for a connection from `source` to `destination`.
#[doc(hidden)]
#[cfg(test)]
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {protocol} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
        .into_bytes()
}

/// A v2 header (PROXY command, STREAM, no TLV) for a connection from `source` to `destination`.
#[doc(hidden)]
#[cfg(test)]
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    let mut out = Vec::with_capacity(V2_FIXED_LEN + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n";
    const WAIT: Duration = Duration::from_secs(5);

    /// A connected (client, server) pair on 127.0.0.1.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// Sends `header` and the request in one write, reads the header on the server side, and checks
    /// that what is left on the connection is exactly the request.
    async fn header_then_request(header: &[u8]) -> ProxyHeader {
        let (mut client, mut server) = pair().await;
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(REQUEST);
        client.write_all(&bytes).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let parsed = read_header(&mut server, WAIT).await.expect("header");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("read rest");
        assert_eq!(rest.escape_ascii().to_string(), REQUEST.escape_ascii().to_string());
        parsed
    }

    async fn header_error(bytes: &[u8]) -> ProxyProtocolError {
        let (mut client, mut server) = pair().await;
        client.write_all(bytes).await.expect("write");
        let err = read_header(&mut server, WAIT).await.expect_err("must fail");
        drop(client);
        err
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).expect("short body").to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn v1_tcp4() {
        let got = header_then_request(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n").await;
        assert_eq!(
            got,
            ProxyHeader::Proxied { source: addr("192.0.2.1:56324"), destination: addr("198.51.100.2:443") }
        );
    }

    #[tokio::test]
    async fn v1_tcp6() {
        let got = header_then_request(b"PROXY TCP6 2001:db8::1 2001:db8::2:1 65535 0\r\n").await;
        assert_eq!(
            got,
            ProxyHeader::Proxied { source: addr("[2001:db8::1]:65535"), destination: addr("[2001:db8::2:1]:0") }
        );
    }

    #[tokio::test]
    async fn v1_unknown() {
        assert_eq!(header_then_request(b"PROXY UNKNOWN\r\n").await, ProxyHeader::Local);
        let with_addresses = b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n";
        assert_eq!(header_then_request(with_addresses).await, ProxyHeader::Local);
    }

    #[tokio::test]
    async fn v2_ipv4() {
        let (source, destination) = (addr("203.0.113.7:40000"), addr("10.1.2.3:8443"));
        let got = header_then_request(&encode_v2(source, destination)).await;
        assert_eq!(got, ProxyHeader::Proxied { source, destination });
    }

    #[tokio::test]
    async fn v2_ipv6() {
        let (source, destination) = (addr("[2001:db8::7]:1"), addr("[2001:db8::8]:443"));
        let got = header_then_request(&encode_v2(source, destination)).await;
        assert_eq!(got, ProxyHeader::Proxied { source, destination });
    }

    #[tokio::test]
    async fn v2_local() {
        // A LOCAL header may still carry a family and addresses; they are ignored.
        assert_eq!(header_then_request(&v2(0, 0x00, &[])).await, ProxyHeader::Local);
        assert_eq!(header_then_request(&v2(0, 0x11, &[9; 12])).await, ProxyHeader::Local);
    }

    #[tokio::test]
    async fn v2_unspec_and_unix_are_local() {
        assert_eq!(header_then_request(&v2(1, 0x00, &[])).await, ProxyHeader::Local);
        assert_eq!(header_then_request(&v2(1, 0x31, &[b'/'; 216])).await, ProxyHeader::Local);
    }

    #[tokio::test]
    async fn v2_tlvs_are_skipped() {
        let (source, destination) = (addr("198.51.100.9:5555"), addr("192.0.2.10:443"));
        let mut header = encode_v2(source, destination);
        // PP2_TYPE_AUTHORITY "a.example.test", then PP2_TYPE_NOOP padding.
        let mut tlvs = vec![0x02, 0, 14];
        tlvs.extend_from_slice(b"a.example.test");
        tlvs.extend_from_slice(&[0x04, 0, 5, 0, 0, 0, 0, 0]);
        header.extend_from_slice(&tlvs);
        let len = u16::from_be_bytes([header[14], header[15]]) + u16::try_from(tlvs.len()).expect("short");
        header[14..16].copy_from_slice(&len.to_be_bytes());
        assert_eq!(header_then_request(&header).await, ProxyHeader::Proxied { source, destination });
    }

    #[tokio::test]
    async fn mixed_families_are_sent_as_v6() {
        let (source, destination) = (addr("192.0.2.1:1000"), addr("[2001:db8::1]:443"));
        let mapped = addr("[::ffff:192.0.2.1]:1000");
        let expected = ProxyHeader::Proxied { source: mapped, destination };
        assert_eq!(header_then_request(&encode_v1(source, destination)).await, expected);
        assert_eq!(header_then_request(&encode_v2(source, destination)).await, expected);
    }

    /// The header arrives in pieces, the last together with the request.
    async fn split_header(header: Vec<u8>, cuts: &[usize]) {
        let (mut client, mut server) = pair().await;
        let reader = tokio::spawn(async move {
            let got = read_header(&mut server, WAIT).await;
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.expect("read rest");
            (got, rest)
        });
        let mut from = 0;
        for &cut in cuts {
            client.write_all(&header[from..cut]).await.expect("write");
            client.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(30)).await;
            from = cut;
        }
        let mut last = header[from..].to_vec();
        last.extend_from_slice(REQUEST);
        client.write_all(&last).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let (got, rest) = reader.await.expect("join");
        assert!(matches!(got, Ok(ProxyHeader::Proxied { .. })), "{got:?}");
        assert_eq!(rest, REQUEST);
    }

    #[tokio::test]
    async fn header_split_across_writes() {
        let (source, destination) = (addr("192.0.2.1:1234"), addr("192.0.2.2:443"));
        split_header(encode_v1(source, destination), &[1, 3, 6, 20, 40]).await;
        split_header(encode_v2(source, destination), &[1, 12, 15, 16, 20]).await;
    }

    #[tokio::test]
    async fn plain_http_is_not_proxy_protocol_and_is_left_unread() {
        let (mut client, mut server) = pair().await;
        client.write_all(REQUEST).await.expect("write");
        let err = read_header(&mut server, WAIT).await.expect_err("must fail");
        assert!(matches!(err, ProxyProtocolError::NotProxyProtocol { .. }), "{err}");
        assert!(err.to_string().contains("GET / HTTP/1.1"), "{err}");
        client.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("read rest");
        assert_eq!(rest, REQUEST);
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        for bytes in [&b"\x16\x03\x01\x02\x00"[..], b"PROXX TCP4", b"\r\n\r\n\0\r\nQUIZ\n", b"\0\0\0\0"] {
            let err = header_error(bytes).await;
            assert!(matches!(err, ProxyProtocolError::NotProxyProtocol { .. }), "{bytes:?}: {err}");
        }
        let err = header_error(b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n").await;
        assert!(matches!(err, ProxyProtocolError::Malformed(_)), "{err}");
    }

    #[tokio::test]
    async fn truncated_and_stalled_header_times_out() {
        for partial in [&b"PROXY TCP4 192.0.2.1"[..], &encode_v2(addr("192.0.2.1:1"), addr("192.0.2.2:2"))[..20]] {
            let (mut client, mut server) = pair().await;
            client.write_all(partial).await.expect("write");
            let started = std::time::Instant::now();
            let err = read_header(&mut server, Duration::from_millis(300)).await.expect_err("must time out");
            assert!(matches!(err, ProxyProtocolError::Timeout { received, .. } if received == partial.len()), "{err}");
            assert!(started.elapsed() >= Duration::from_millis(300));
            drop(client);
        }
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (_client, mut server) = pair().await;
        let err = read_header(&mut server, Duration::from_millis(100)).await.expect_err("must time out");
        assert!(matches!(err, ProxyProtocolError::Timeout { received: 0, .. }), "{err}");
    }

    #[tokio::test]
    async fn peer_closing_mid_header_is_an_error() {
        for partial in [&b"PROXY TCP6 2001:db8::1"[..], &encode_v2(addr("[::1]:1"), addr("[::1]:2"))[..30], b""] {
            let (mut client, mut server) = pair().await;
            client.write_all(partial).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let err = read_header(&mut server, WAIT).await.expect_err("must fail");
            assert!(matches!(err, ProxyProtocolError::Closed { received } if received == partial.len()), "{err}");
        }
    }

    #[tokio::test]
    async fn oversized_v2_length_is_refused() {
        let mut header = v2(1, 0x11, &[0; 12]);
        header[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        let err = header_error(&header[..V2_FIXED_LEN]).await;
        assert!(matches!(err, ProxyProtocolError::TooLong { len: 65551, max: V2_MAX_LEN }), "{err}");
    }

    #[tokio::test]
    async fn v2_datagram_is_refused() {
        let err = header_error(&v2(1, 0x12, &[0; 12])).await;
        assert!(matches!(err, ProxyProtocolError::Unsupported(_)), "{err}");
    }

    #[tokio::test]
    async fn v1_without_crlf_in_107_bytes_is_refused() {
        let mut line =
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ".to_vec();
        line.extend_from_slice(b"65535 65535 and more");
        assert!(line.len() > V1_MAX_LEN);
        let err = header_error(&line).await;
        assert!(matches!(err, ProxyProtocolError::Malformed(ref m) if m.contains("no CRLF")), "{err}");
    }

    #[test]
    fn longest_v1_line_is_accepted() {
        // The spec's worst case.
        let line = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(line.len(), V1_MAX_LEN);
        assert_eq!(parse(line).ok(), Some(Parsed::Complete { header: ProxyHeader::Local, len: V1_MAX_LEN }));
        let mut too_long = line[..V1_MAX_LEN - 2].to_vec();
        too_long.extend_from_slice(b"5\r\n");
        assert!(matches!(parse(&too_long), Err(ProxyProtocolError::Malformed(_))));
        assert!(matches!(parse(&too_long[..V1_MAX_LEN]), Err(ProxyProtocolError::Malformed(_))));
    }

    #[test]
    fn v1_is_parsed_strictly() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 443 1\r\n",
            b"PROXY TCP4  192.0.2.1 192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 443 \r\n",
            b"PROXY TCP4 192.0.2.1 2001:db8::1 80 443\r\n",
            b"PROXY TCP6 192.0.2.1 192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2.01 192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 080 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 +80 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 65536\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 443\r\n",
            b"PROXY tcp4 192.0.2.1 192.0.2.2 80 443\r\n",
            b"PROXY UDP4 192.0.2.1 192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2.1\t192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 443\r\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 443\n",
            b"PROXY \r\n",
        ];
        for line in bad {
            let got = parse(line);
            assert!(matches!(got, Err(ProxyProtocolError::Malformed(_))), "{}: {got:?}", line.escape_ascii());
        }
        assert!(matches!(parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 0 65535\r\n"), Ok(Parsed::Complete { .. })));
    }

    #[test]
    fn prefixes_wait_for_more() {
        assert_eq!(parse(b"").ok(), Some(Parsed::Incomplete { want: 1 }));
        assert_eq!(parse(b"PRO").ok(), Some(Parsed::Incomplete { want: 4 }));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r").ok(), Some(Parsed::Incomplete { want: 32 }));
        assert_eq!(parse(b"\r\n\r\n\0").ok(), Some(Parsed::Incomplete { want: V2_FIXED_LEN }));
        let full = encode_v2(addr("[::1]:1"), addr("[::1]:2"));
        assert_eq!(parse(&full[..16]).ok(), Some(Parsed::Incomplete { want: full.len() }));
    }

    #[test]
    fn v2_is_parsed_strictly() {
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        let mut bad_command = v2(1, 0x11, &[0; 12]);
        bad_command[12] = 0x22;
        for header in [bad_version, bad_command, v2(1, 0x11, &[0; 11]), v2(1, 0x21, &[0; 35]), v2(1, 0x41, &[0; 12])] {
            let got = parse(&header);
            assert!(matches!(got, Err(ProxyProtocolError::Malformed(_))), "{header:?}: {got:?}");
        }
    }
}
