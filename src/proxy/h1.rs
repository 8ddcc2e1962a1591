//! The proxy's own HTTP/1.1 client side, driven inline in the request's task: no connection task
//! and no channel per upstream connection (hyper's client costs a task wake-up and a channel hop
//! per request). This module owns the wire format: the request head as one buffer, the response
//! head (parsed with `httparse`), and the response body's framing (length, chunked with
//! extensions and trailers, until close, none). The I/O around it is in `pool.rs` and `body.rs`.

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Frame;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Uri};

/// A response head larger than this is refused (nginx's `proxy_buffer_size` is 4–8 KiB; we allow
/// more, as hyper's client did by default).
pub const MAX_HEAD: usize = 64 << 10;
/// Headers in one response head (or trailer section).
const MAX_HEADERS: usize = 128;
/// A chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid response head: {0}")]
    BadHead(String),
    #[error("invalid Content-Length {0:?}")]
    BadLength(String),
    #[error("invalid chunk size line")]
    BadChunk,
    #[error("invalid trailers")]
    BadTrailers,
    #[error("the instance closed the connection in the middle of the response body")]
    Truncated,
}

/// How the request body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body (and no length header).
    None,
    Length(u64),
    Chunked,
}

/// Writes the request head: the request line, the headers as they are (the caller removed the
/// hop-by-hop ones), and the body's framing header.
pub fn encode_head(method: &Method, uri: &Uri, headers: &HeaderMap, framing: RequestFraming, out: &mut Vec<u8>) {
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut size = method.as_str().len() + target.len() + 16;
    for (name, value) in headers {
        size += name.as_str().len() + value.len() + 4;
    }
    out.reserve(size + 32);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == hyper::header::CONTENT_LENGTH {
            // Written below from the body's framing.
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            let _ = std::io::Write::write_fmt(out, format_args!("content-length: {n}\r\n"));
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// One chunk of a chunked request body on the wire: size line, data, CRLF.
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + 20);
    let _ = std::io::Write::write_fmt(out, format_args!("{:x}\r\n", data.len()));
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, with trailers if any.
pub fn encode_last_chunk(trailers: Option<&HeaderMap>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    /// The end-to-end headers: those that describe this hop (RFC 9110 §7.6.1) are left out…
    pub headers: HeaderMap,
    /// …except those the `Connection` header names, which the caller removes.
    pub hop_named: Vec<HeaderName>,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    pub body: Decoder,
}

/// Parses a response head at the start of `buf`; `Ok(None)` when more bytes are needed. On
/// success the head's bytes are consumed from `buf`. `head_request`: the request was `HEAD` (the
/// response has no body whatever its headers say).
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, FramingError> {
    // Where each header's name and value are in `buf`: the values are then shared with the
    // frozen head (no copy), as hyper does.
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let (len, code, http11, count) = {
        let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut raw);
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(FramingError::HeadTooLarge);
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(FramingError::BadHead(format!("more than {MAX_HEADERS} headers")))
            }
            Err(e) => return Err(FramingError::BadHead(e.to_string())),
        };
        let base = buf.as_ptr() as usize;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            *span = (h.name.as_ptr() as usize - base, h.name.len(), h.value.as_ptr() as usize - base, h.value.len());
        }
        (len, resp.code.unwrap_or(0), resp.version == Some(1), resp.headers.len())
    };
    if len > MAX_HEAD {
        return Err(FramingError::HeadTooLarge);
    }
    let status = StatusCode::from_u16(code).map_err(|_| FramingError::BadHead(format!("status {code}")))?;
    let raw_head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = !http11;
    let mut hop_named = Vec::new();
    for &(ns, nl, vs, vl) in &spans[..count] {
        let name_bytes = &raw_head[ns..ns + nl];
        let value_bytes = &raw_head[vs..vs + vl];
        let name = HeaderName::from_bytes(name_bytes)
            .map_err(|_| FramingError::BadHead(format!("header name {:?}", String::from_utf8_lossy(name_bytes))))?;
        let value = HeaderValue::from_maybe_shared(raw_head.slice(vs..vs + vl))
            .map_err(|_| FramingError::BadHead(format!("value of {name}")))?;
        if name == hyper::header::CONTENT_LENGTH {
            let s = std::str::from_utf8(value_bytes).unwrap_or("");
            // A list of identical values is one length (RFC 9110 §8.6); different ones are an error.
            for part in s.split(',') {
                let part = part.trim();
                let n: u64 = part
                    .parse()
                    .ok()
                    .filter(|_| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| FramingError::BadLength(s.to_string()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(FramingError::BadLength(s.to_string()));
                }
                length = Some(n);
            }
        } else if name == hyper::header::TRANSFER_ENCODING {
            transfer_encoding = true;
            let s = std::str::from_utf8(value_bytes).unwrap_or("");
            // Only the last coding decides whether the body is chunked.
            chunked = s.rsplit(',').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        } else if name == hyper::header::CONNECTION {
            let s = std::str::from_utf8(value_bytes).unwrap_or("");
            for t in s.split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("close") {
                    close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    close &= http11;
                } else if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                    hop_named.push(n);
                }
            }
        }
        if !hop_by_hop(&name) {
            headers.append(name, value);
        }
    }
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = if no_body {
        Decoder::Done
    } else if transfer_encoding {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3); a response whose last coding
        // is not chunked runs until the connection closes.
        if chunked {
            Decoder::Chunked(Chunked::Size)
        } else {
            close = true;
            Decoder::Eof
        }
    } else {
        match length {
            Some(0) => Decoder::Done,
            Some(n) => Decoder::Length(n),
            None => {
                close = true;
                Decoder::Eof
            }
        }
    };
    if transfer_encoding && length.is_some() {
        // Both framings at once may be an attempt to smuggle: never reuse that connection.
        close = true;
    }
    Ok(Some(Head { status, headers, hop_named, keep_alive: !close, body }))
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    use hyper::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == TE
        || name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// The response body's framing, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Length(u64),
    Chunked(Chunked),
    /// Until the instance closes the connection.
    Eof,
    Done,
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// Bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next frame out of `buf`; `Ok(None)` when more bytes are needed (or, once
    /// [`Decoder::is_done`], at the end). Data frames share `buf`'s memory (no copy).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, FramingError> {
        loop {
            match *self {
                Decoder::Done => return Ok(None),
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(n).freeze();
                    *self = if left == n as u64 { Decoder::Done } else { Decoder::Length(left - n as u64) };
                    return Ok(Some(Frame::data(data)));
                }
                Decoder::Eof => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(buf.split().freeze())));
                }
                Decoder::Chunked(Chunked::Size) => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(FramingError::BadChunk);
                        }
                        return Ok(None);
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(FramingError::BadChunk);
                    }
                    let size = parse_chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = Decoder::Chunked(if size == 0 { Chunked::Trailers } else { Chunked::Data(size) });
                }
                Decoder::Chunked(Chunked::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(n).freeze();
                    *self = Decoder::Chunked(if left == n as u64 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - n as u64)
                    });
                    return Ok(Some(Frame::data(data)));
                }
                Decoder::Chunked(Chunked::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(FramingError::BadChunk);
                    }
                    buf.advance(2);
                    *self = Decoder::Chunked(Chunked::Size);
                }
                Decoder::Chunked(Chunked::Trailers) => {
                    // The trailer section ends with an empty line; without trailers that is at once.
                    if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                        buf.advance(2);
                        *self = Decoder::Done;
                        return Ok(None);
                    }
                    let Some(end) = find(buf, b"\r\n\r\n") else {
                        if buf.len() > MAX_HEAD {
                            return Err(FramingError::BadTrailers);
                        }
                        return Ok(None);
                    };
                    let trailers = parse_trailers(&buf[..end + 4])?;
                    buf.advance(end + 4);
                    *self = Decoder::Done;
                    return Ok(Some(Frame::trailers(trailers)));
                }
            }
        }
    }

    /// The connection reached its end: fine for a body that runs until close, an error otherwise.
    pub fn at_eof(&mut self) -> Result<(), FramingError> {
        match self {
            Decoder::Eof | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(FramingError::Truncated),
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n")
}

fn find(buf: &[u8], pat: &[u8]) -> Option<usize> {
    buf.windows(pat.len()).position(|w| w == pat)
}

/// `1a;name=value` → 26 (extensions are ignored, as RFC 9112 §7.1.1 allows).
fn parse_chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let hex_end = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
    if hex_end == 0 || hex_end > 15 {
        return Err(FramingError::BadChunk);
    }
    let rest = &line[hex_end..];
    let rest_ok = rest.is_empty() || {
        let t = rest.iter().position(|b| *b != b' ' && *b != b'\t').map(|i| &rest[i..]).unwrap_or(&[]);
        t.is_empty() || t[0] == b';'
    };
    if !rest_ok {
        return Err(FramingError::BadChunk);
    }
    let s = std::str::from_utf8(&line[..hex_end]).map_err(|_| FramingError::BadChunk)?;
    u64::from_str_radix(s, 16).map_err(|_| FramingError::BadChunk)
}

fn parse_trailers(section: &[u8]) -> Result<HeaderMap, FramingError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut raw) {
        Ok(httparse::Status::Complete((_, parsed))) => {
            let mut map = HeaderMap::with_capacity(parsed.len());
            for h in parsed {
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| FramingError::BadTrailers)?;
                let value = HeaderValue::from_bytes(h.value).map_err(|_| FramingError::BadTrailers)?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(FramingError::BadTrailers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, head_request: bool) -> Result<Option<Head>, FramingError> {
        parse_head(&mut BytesMut::from(raw), head_request)
    }

    /// Feeds `wire` to a decoder `step` bytes at a time; returns the data and the trailers.
    fn decode_split(mut d: Decoder, wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), FramingError> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(frame) = d.decode(&mut buf)? {
                match frame.into_data() {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
        }
        if !d.is_done() {
            d.at_eof()?;
        }
        Ok((data, trailers))
    }

    #[test]
    fn request_head_is_one_buffer_with_its_framing() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("web.localhost"));
        h.insert("content-length", HeaderValue::from_static("999"));
        let mut out = Vec::new();
        encode_head(&Method::POST, &"/a?b=1".parse().expect("uri"), &h, RequestFraming::Length(5), &mut out);
        assert_eq!(out, b"POST /a?b=1 HTTP/1.1\r\nhost: web.localhost\r\ncontent-length: 5\r\n\r\n");
        out.clear();
        encode_head(&Method::PUT, &"/".parse().expect("uri"), &h, RequestFraming::Chunked, &mut out);
        assert_eq!(out, b"PUT / HTTP/1.1\r\nhost: web.localhost\r\ntransfer-encoding: chunked\r\n\r\n");
        out.clear();
        encode_chunk(b"hello world, this is 26 b!", &mut out);
        encode_last_chunk(None, &mut out);
        assert_eq!(out, b"1a\r\nhello world, this is 26 b!\r\n0\r\n\r\n");
    }

    #[test]
    fn content_length_body_split_anywhere() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: b\r\n\r\nhello world";
        for step in 1..wire.len() {
            let mut buf = BytesMut::new();
            let mut parsed = None;
            let mut rest = &wire[..];
            while parsed.is_none() {
                let (a, b) = rest.split_at(step.min(rest.len()));
                buf.extend_from_slice(a);
                rest = b;
                parsed = parse_head(&mut buf, false).expect("valid head");
            }
            let h = parsed.expect("head");
            assert_eq!(h.status, 200);
            assert!(h.keep_alive);
            assert_eq!(h.headers["x-a"], "b");
            buf.extend_from_slice(rest);
            let mut d = h.body;
            let mut data = Vec::new();
            while let Some(f) = d.decode(&mut buf).expect("frame") {
                data.extend_from_slice(&f.into_data().expect("data"));
            }
            assert_eq!(data, b"hello world");
            assert!(d.is_done());
        }
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let wire = b"5;ext=1;q=\"x\"\r\nhello\r\n6 ; e\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n";
        for step in 1..=wire.len() {
            let (data, trailers) = decode_split(Decoder::Chunked(Chunked::Size), wire, step).expect("valid");
            assert_eq!(data, b"hello world", "step {step}");
            let t = trailers.expect("trailers");
            assert_eq!(t["x-checksum"], "abc");
            assert_eq!(t["x-other"], "1");
        }
        let (data, trailers) = decode_split(Decoder::Chunked(Chunked::Size), b"3\r\nabc\r\n0\r\n\r\n", 1).expect("ok");
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
    }

    #[test]
    fn bad_chunked_framing_is_an_error() {
        for wire in [&b"zz\r\nab\r\n0\r\n\r\n"[..], b"3\r\nabcX\r\n", b"3 junk\r\nabc\r\n", b"\r\n"] {
            assert_eq!(
                decode_split(Decoder::Chunked(Chunked::Size), wire, 64).err(),
                Some(FramingError::BadChunk),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(decode_split(Decoder::Chunked(Chunked::Size), &long, 64).is_err());
        // Cut short: the end of the connection before the last chunk.
        assert_eq!(decode_split(Decoder::Chunked(Chunked::Size), b"5\r\nhel", 64).err(), Some(FramingError::Truncated));
        assert_eq!(decode_split(Decoder::Length(10), b"short", 64).err(), Some(FramingError::Truncated));
    }

    #[test]
    fn close_delimited_body_runs_to_the_end() {
        let h = head("HTTP/1.1 200 OK\r\n\r\n", false).expect("ok").expect("complete");
        assert_eq!(h.body, Decoder::Eof);
        assert!(!h.keep_alive);
        let (data, _) = decode_split(h.body, b"everything until close", 5).expect("ok");
        assert_eq!(data, b"everything until close");
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false).expect("ok").expect("complete");
        assert_eq!(h.body, Decoder::Eof);
        assert!(!h.keep_alive);
    }

    #[test]
    fn bodiless_responses() {
        for raw in [
            "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ] {
            let h = head(raw, false).expect("ok").expect("complete");
            assert!(h.body.is_done(), "{raw}");
            assert!(h.keep_alive, "{raw}");
        }
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", true).expect("ok").expect("complete");
        assert!(h.body.is_done());
        assert_eq!(h.headers["content-length"], "500");
    }

    #[test]
    fn keep_alive_rules() {
        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", false).expect("ok");
        assert!(!h.expect("complete").keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).expect("ok");
        assert!(!h.expect("complete").keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n", false).expect("ok");
        assert!(h.expect("complete").keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", false)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.body, Decoder::Chunked(Chunked::Size));
        assert!(!h.keep_alive);
    }

    #[test]
    fn hop_by_hop_headers_are_left_out() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n\
                   Transfer-Encoding: chunked\r\nUpgrade: h2c\r\nX-Kept: 1\r\n\r\n";
        let h = head(raw, false).expect("ok").expect("complete");
        assert_eq!(h.headers.len(), 2, "{:?}", h.headers);
        assert_eq!(h.headers["x-kept"], "1");
        assert_eq!(h.hop_named, vec![HeaderName::from_static("x-hop")]);
        assert!(h.keep_alive);
    }

    #[test]
    fn bad_heads_are_errors() {
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", false),
            Err(FramingError::BadLength(_))
        ));
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false),
            Err(FramingError::BadLength(_))
        ));
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n", false).expect("same twice").is_some());
        assert!(matches!(head("SSH-2.0-OpenSSH\r\n\r\n", false), Err(FramingError::BadHead(_))));
        assert!(matches!(head("HTTP/1.1 2000 OK\r\n\r\n", false), Err(FramingError::BadHead(_))));
        let mut big = String::from("HTTP/1.1 200 OK\r\n");
        while big.len() <= MAX_HEAD {
            big.push_str("X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(head(&big, false).is_err());
        let mut long = String::from("HTTP/1.1 200 OK\r\nX-Long: ");
        long.push_str(&"a".repeat(MAX_HEAD + 1));
        assert_eq!(head(&long, false).err(), Some(FramingError::HeadTooLarge));
        assert!(head("HTTP/1.1 200 OK\r\nContent-", false).expect("partial").is_none());
    }
}
