//! The HTTP/1.x wire format as this app speaks it: reading and parsing a request head, request
//! bodies (Content-Length or chunked, streamed through a small buffer), and chunk framing for
//! answers. No sockets here, so every piece is unit-tested on byte slices.

use std::io::{self, BufRead, Read, Write};

/// The most a request head (request line, header fields, blank line) may take; also the bound on
/// the trailer section of a chunked request body.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most a chunk-size line (hex size plus extensions) may take.
const MAX_CHUNK_LINE: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    /// As sent: path and query, not decoded.
    pub target: String,
    pub version: Version,
    /// In the order received; names lowercased, values as sent minus surrounding blanks.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target.as_str(), |(path, _)| path)
    }

    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, query)| query)
    }

    /// The first value of header `name` (lowercase), if it is there and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Whether the comma-separated lists of every `name` header hold `token` (any case).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

#[derive(Debug)]
pub enum HeadError {
    /// The head is larger than [`MAX_HEAD`].
    TooLarge,
    /// The connection failed or ended in the middle of a head.
    Broken,
}

/// Reads one request head, through its blank line, skipping blank lines before the request line
/// (RFC 9112 §2.2). `Ok(None)` when the peer closed or went idle before starting a request.
pub fn read_head<R: BufRead>(reader: &mut R) -> Result<Option<Vec<u8>>, HeadError> {
    let mut head = Vec::new();
    let mut consumed = 0;
    loop {
        if consumed >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let start = head.len();
        let n = match reader.by_ref().take((MAX_HEAD - consumed) as u64).read_until(b'\n', &mut head) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if head.is_empty() => return Ok(None),
            Err(_) => return Err(HeadError::Broken),
        };
        consumed += n;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(HeadError::Broken);
        }
        let line = &head[start..];
        if line == b"\n" || line == b"\r\n" {
            if start == 0 {
                head.clear();
            } else {
                return Ok(Some(head));
            }
        }
    }
}

/// Parses a head as [`read_head`] returns it; `Err` says what is wrong, for the 400 answer.
pub fn parse_head(bytes: &[u8]) -> Result<Head, String> {
    let mut lines = bytes.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let request_line = std::str::from_utf8(request_line).map_err(|_| "the request line is not UTF-8".to_string())?;
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("expected `METHOD TARGET HTTP/1.x`, got {request_line:?}"));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(format!("bad method {method:?}"));
    }
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("bad request target {target:?}"));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        _ => return Err(format!("unsupported version {version:?}: expected HTTP/1.0 or HTTP/1.1")),
    };

    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        if line[0] == b' ' || line[0] == b'\t' {
            return Err("obsolete line folding in the header section".into());
        }
        let colon = line.iter().position(|&b| b == b':').ok_or_else(|| {
            format!("header line without a colon: {:?}", String::from_utf8_lossy(&line[..line.len().min(80)]))
        })?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().copied().all(is_token_byte) {
            return Err(format!("bad header name {:?}", String::from_utf8_lossy(&name[..name.len().min(80)])));
        }
        let value = trim_blanks(value);
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(format!("control character in header {:?}", String::from_utf8_lossy(name)));
        }
        headers.push((String::from_utf8_lossy(name).to_ascii_lowercase(), value.to_vec()));
    }
    Ok(Head { method: method.to_string(), target: target.to_string(), version, headers })
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_blanks(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// The body framing a head declares (RFC 9112 §6.3): chunked wins over Content-Length; no
/// framing header means no body.
pub fn request_framing(head: &Head) -> Result<Framing, String> {
    let codings: Vec<String> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v).split(',').map(|c| c.trim().to_ascii_lowercase()).collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty())
        .collect();
    if head.headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return match codings.as_slice() {
            [only] if only == "chunked" => Ok(Framing::Chunked),
            _ => Err(format!("unsupported transfer-encoding {codings:?}: only `chunked` is understood")),
        };
    }
    let mut length = None;
    for (_, value) in head.headers.iter().filter(|(n, _)| n == "content-length") {
        // A repeated header (or a list) is fine as long as every value agrees.
        for text in String::from_utf8_lossy(value).split(',') {
            let text = text.trim();
            let n = text
                .parse::<u64>()
                .ok()
                .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("bad content-length {text:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".into());
            }
            length = Some(n);
        }
    }
    Ok(Framing::Length(length.unwrap_or(0)))
}

/// A request body, read from the connection as the route consumes it. Reads fail with
/// `InvalidData` on bad chunk framing and `UnexpectedEof` if the connection ends early.
pub struct Body<R> {
    inner: R,
    state: BodyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// Bytes left of a Content-Length body.
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Bytes left of the current chunk.
    ChunkData(u64),
    /// Before the CRLF that ends a chunk's data.
    ChunkEnd,
    Done,
}

impl<R: BufRead> Body<R> {
    pub fn new(inner: R, framing: Framing) -> Body<R> {
        let state = match framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::ChunkSize,
        };
        Body { inner, state }
    }

    /// Whether the body has been read to its end (the connection is at the next request).
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// The connection under the body, for what follows it (a protocol switch).
    pub fn connection(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads up to `buf.len()` (and up to `left`) body bytes; 0 only for an empty `buf`.
    fn read_data(&mut self, buf: &mut [u8], left: u64) -> io::Result<usize> {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("connection ended {left} bytes short")));
        }
        Ok(n)
    }
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length(left) => {
                    let n = self.read_data(buf, left)?;
                    let left = left - n as u64;
                    self.state = if left == 0 { BodyState::Done } else { BodyState::Length(left) };
                    return Ok(n);
                }
                BodyState::ChunkSize => {
                    let line = read_line(&mut self.inner, MAX_CHUNK_LINE, "chunk-size line")?;
                    let size = parse_chunk_size(&line).map_err(invalid)?;
                    self.state = if size == 0 {
                        skip_trailers(&mut self.inner)?;
                        BodyState::Done
                    } else {
                        BodyState::ChunkData(size)
                    };
                }
                BodyState::ChunkData(left) => {
                    let n = self.read_data(buf, left)?;
                    let left = left - n as u64;
                    self.state = if left == 0 { BodyState::ChunkEnd } else { BodyState::ChunkData(left) };
                    return Ok(n);
                }
                BodyState::ChunkEnd => {
                    let line = read_line(&mut self.inner, 2, "end of chunk data")?;
                    if !line.is_empty() {
                        return Err(invalid("chunk data longer than its size".into()));
                    }
                    self.state = BodyState::ChunkSize;
                }
            }
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads a line of at most `max` bytes with its line end (CRLF or LF); returns it without.
fn read_line<R: BufRead>(reader: &mut R, max: usize, what: &str) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    reader.by_ref().take(max as u64).read_until(b'\n', &mut line)?;
    match line.strip_suffix(b"\n") {
        Some(content) => Ok(content.strip_suffix(b"\r").unwrap_or(content).to_vec()),
        None if line.len() >= max => Err(invalid(format!("{what} longer than {max} bytes"))),
        None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("connection ended in a {what}"))),
    }
}

/// The size of a chunk-size line (`1a;ext=1`): hex digits, then optional extensions.
fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = trim_blanks(digits);
    let text = String::from_utf8_lossy(digits);
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!("bad chunk size {:?}", &text[..text.len().min(40)]));
    }
    u64::from_str_radix(&text, 16).map_err(|e| format!("bad chunk size {text:?}: {e}"))
}

/// Reads the trailer section after the last chunk, through its blank line, and drops it.
fn skip_trailers<R: BufRead>(reader: &mut R) -> io::Result<()> {
    let mut total = 0;
    loop {
        let line = read_line(reader, MAX_HEAD.saturating_sub(total).max(2), "trailer section")?;
        if line.is_empty() {
            return Ok(());
        }
        total += line.len() + 2;
        if total >= MAX_HEAD {
            return Err(invalid(format!("trailer section larger than {MAX_HEAD} bytes")));
        }
    }
}

/// Writes one chunk of `len` bytes taken from `data` (which must hold that many).
pub fn write_chunk<W: Write, D: Read>(out: &mut W, len: u64, data: &mut D) -> io::Result<()> {
    if len == 0 {
        // A zero-size chunk would end the body.
        return Ok(());
    }
    write!(out, "{len:x}\r\n")?;
    copy_exactly(data, out, len)?;
    out.write_all(b"\r\n")
}

/// Writes the last chunk and the trailer fields.
pub fn write_last_chunk<W: Write>(out: &mut W, trailers: &[(&str, &str)]) -> io::Result<()> {
    out.write_all(b"0\r\n")?;
    for (name, value) in trailers {
        write!(out, "{name}: {value}\r\n")?;
    }
    out.write_all(b"\r\n")
}

/// Copies exactly `len` bytes from `data` to `out`; fails if `data` ends before.
pub fn copy_exactly<W: Write, D: Read>(data: &mut D, out: &mut W, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut data.take(len), out)?;
    if copied < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{copied} of {len} body bytes")));
    }
    Ok(())
}

/// The reason phrase of `status` (RFC 9110 §15), `Unknown` for codes not listed.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(raw: &[u8], framing: Framing) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut input = raw;
        let mut body = Body::new(&mut input, framing);
        let mut out = Vec::new();
        // A tiny buffer so chunk boundaries fall inside reads.
        let mut buf = [0u8; 3];
        loop {
            match body.read(&mut buf)? {
                0 => break,
                n => out.extend_from_slice(&buf[..n]),
            }
        }
        assert!(body.is_done());
        Ok((out, input.to_vec()))
    }

    #[test]
    fn chunked_bodies_decode_and_stop_at_their_end() {
        let raw =
            b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.1";
        let (body, rest) = read_all(raw, Framing::Chunked).unwrap();
        assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(rest, b"GET / HTTP/1.1", "the next request must stay unread");
        // Bare LF line ends and blanks before extensions are tolerated.
        let (body, _) = read_all(b"3 ;x\nabc\n0\n\n", Framing::Chunked).unwrap();
        assert_eq!(body, b"abc");
    }

    #[test]
    fn bad_chunked_bodies_are_errors_not_panics() {
        let cases: [&[u8]; 8] = [
            b"zz\r\nab\r\n0\r\n\r\n",
            b"\r\n",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"3\r\nab",
            b"5\r\nabcde\r\n",
            b"0\r\nX: 1\r\n",
        ];
        for raw in cases {
            let err = read_all(raw, Framing::Chunked).unwrap_err();
            assert!(
                matches!(err.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof),
                "{:?}: {err}",
                String::from_utf8_lossy(raw)
            );
        }
        let endless_size_line = vec![b'1'; MAX_CHUNK_LINE * 2];
        assert_eq!(read_all(&endless_size_line, Framing::Chunked).unwrap_err().kind(), io::ErrorKind::InvalidData);
        // The largest size that fits is accepted (and then found short).
        let err = read_all(b"ffffffffffffffff\r\nab", Framing::Chunked).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn length_bodies_stop_at_their_length_and_fail_short() {
        let (body, rest) = read_all(b"hello world", Framing::Length(5)).unwrap();
        assert_eq!((body.as_slice(), rest.as_slice()), (&b"hello"[..], &b" world"[..]));
        assert_eq!(read_all(b"hel", Framing::Length(5)).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(Body::new(&b""[..], Framing::Length(0)).is_done());
    }

    #[test]
    fn heads_are_read_through_the_blank_line_only() {
        let mut input: &[u8] = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        let head = read_head(&mut input).unwrap().unwrap();
        assert_eq!(head, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(input, b"body");
        assert!(read_head(&mut &b""[..]).unwrap().is_none());
        assert!(matches!(read_head(&mut &b"GET / HTTP/1.1\r\nHo"[..]), Err(HeadError::Broken)));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD * 2, b'a');
        assert!(matches!(read_head(&mut huge.as_slice()), Err(HeadError::TooLarge)));
        let blank_lines = vec![b'\n'; MAX_HEAD + 1];
        assert!(matches!(read_head(&mut blank_lines.as_slice()), Err(HeadError::TooLarge)));
    }

    #[test]
    fn heads_parse_into_method_target_version_and_headers() {
        let head =
            parse_head(b"POST /up?x=1 HTTP/1.0\r\nHost:  a.test \r\nX-Mixed-Case: \tV a l\r\nEmpty:\r\n\r\n").unwrap();
        assert_eq!((head.method.as_str(), head.path(), head.query()), ("POST", "/up", "x=1"));
        assert_eq!(head.version, Version::Http10);
        let headers: Vec<(&str, &[u8])> = head.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        assert_eq!(headers, [("host", &b"a.test"[..]), ("x-mixed-case", b"V a l"), ("empty", b"")]);
        assert_eq!(head.header("x-mixed-case"), Some("V a l"));

        let head = parse_head(b"GET / HTTP/1.1\nConnection: keep-alive, Upgrade\nconnection: x\n\n").unwrap();
        assert!(head.has_token("connection", "upgrade") && head.has_token("connection", "x"));
        assert!(!head.has_token("connection", "close"));
    }

    #[test]
    fn malformed_heads_are_refused_with_a_reason() {
        let cases: [&[u8]; 10] = [
            b"\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad name: v\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            b"\xff / HTTP/1.1\r\n\r\n",
        ];
        for raw in cases {
            assert!(parse_head(raw).is_err(), "{:?} was accepted", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |raw: &[u8]| request_framing(&parse_head(raw).unwrap());
        assert_eq!(framing(b"GET / HTTP/1.1\r\n\r\n"), Ok(Framing::Length(0)));
        assert_eq!(framing(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"), Ok(Framing::Length(12)));
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\n"),
            Ok(Framing::Length(3))
        );
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nContent-Length: 3\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n",
        ] {
            assert!(framing(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunks_are_framed_with_hex_sizes_and_trailers() {
        let mut out = Vec::new();
        write_chunk(&mut out, 26, &mut io::repeat(b'x')).unwrap();
        write_chunk(&mut out, 0, &mut io::empty()).unwrap();
        write_last_chunk(&mut out, &[("X-A", "1")]).unwrap();
        assert_eq!(out, format!("1a\r\n{}\r\n0\r\nX-A: 1\r\n\r\n", "x".repeat(26)).into_bytes());
        assert!(write_chunk(&mut Vec::new(), 5, &mut &b"abc"[..]).is_err());
        let (body, _) = read_all(&out, Framing::Chunked).unwrap();
        assert_eq!(body.len(), 26);
    }
}
