//! One exchange with an instance over an [`UpConn`], inline in the request's task: the request
//! goes out (head and a buffered body in one write, or a streamed body frame by frame while the
//! answer is watched for), and the response head comes back. The body is read later, by
//! `body.rs`, from the same connection.

use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::body::{Exchange, RequestBody};
use super::h1::{self, Head};
use super::pool::{unacked_fd, UpConn};
use super::timer::{timeout, Wheel};

/// Bytes asked of the socket per read while waiting for a response head.
pub const READ_CHUNK: usize = 8 << 10;

/// A request ready for the wire.
pub struct Outgoing {
    /// The encoded head (request line, headers, framing).
    pub head: Bytes,
    pub body: OutBody,
    /// `HEAD`: the response has no body whatever it says.
    pub head_request: bool,
}

pub enum OutBody {
    None,
    /// Read in full beforehand; sent with the head in one write.
    Full(Bytes),
    /// Streamed from the client as it arrives (chunked when its length is unknown).
    Stream {
        body: RequestBody,
        chunked: bool,
    },
}

impl Outgoing {
    /// A copy for another attempt, when the body is not a stream.
    pub fn replica(&self) -> Option<Outgoing> {
        let body = match &self.body {
            OutBody::None => OutBody::None,
            OutBody::Full(b) => OutBody::Full(b.clone()),
            OutBody::Stream { .. } => return None,
        };
        Some(Outgoing { head: self.head.clone(), body, head_request: self.head_request })
    }
}

/// How sending a request and waiting for its answer ended.
pub enum Sent {
    /// The response head; `complete`: the whole request went out (else the instance answered
    /// before it had all of it, and the connection cannot be reused).
    Head(Head, bool),
    Failed(Failure),
    TimedOut,
}

pub struct Failure {
    pub error: String,
    /// The instance provably never read the whole request: it reset the connection, or closed
    /// it while bytes of the request were still unacknowledged.
    pub unread: bool,
    /// Nothing of a streamed body was taken from the client: the request can go out again.
    pub intact: bool,
}

enum Error {
    Io(std::io::Error),
    Eof,
    Framing(h1::FramingError),
    Body(String),
}

impl Error {
    fn describe(&self) -> String {
        match self {
            Error::Io(e) => e.to_string(),
            Error::Eof => "the instance closed the connection before answering".into(),
            Error::Framing(e) => e.to_string(),
            Error::Body(e) => format!("request body: {e}"),
        }
    }
}

/// Reads until a final (non-1xx) response head is complete. Cancel-safe: what was read stays in
/// `buf`.
async fn read_head(
    rd: &mut tokio::net::tcp::ReadHalf<'_>,
    buf: &mut bytes::BytesMut,
    head_request: bool,
) -> Result<Head, Error> {
    loop {
        if !buf.is_empty() {
            match h1::parse_head(buf, head_request) {
                // Interim answers (100 Continue, 103 Early Hints) are not passed on.
                Ok(Some(h)) if h.status.is_informational() => {
                    if h.status == hyper::StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Error::Framing(h1::FramingError::BadHead("101 without an upgrade request".into())));
                    }
                    continue;
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(e) => return Err(Error::Framing(e)),
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(buf).await {
            Ok(0) => return Err(Error::Eof),
            Ok(_) => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

/// Writes a streamed body, frame by frame, in its framing.
async fn pump(
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    body: &mut RequestBody,
    chunked: bool,
    started: &std::sync::atomic::AtomicBool,
) -> Result<(), Error> {
    let mut out = Vec::new();
    loop {
        let frame = body.frame().await;
        started.store(true, std::sync::atomic::Ordering::Relaxed);
        out.clear();
        match frame {
            None => {
                if chunked {
                    h1::encode_last_chunk(None, &mut out);
                    wr.write_all(&out).await.map_err(Error::Io)?;
                }
                return Ok(());
            }
            Some(Err(e)) => return Err(Error::Body(e.to_string())),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) if chunked => {
                    h1::encode_chunk(&data, &mut out);
                    wr.write_all(&out).await.map_err(Error::Io)?;
                }
                Ok(data) => wr.write_all(&data).await.map_err(Error::Io)?,
                Err(frame) => {
                    if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                        h1::encode_last_chunk(Some(&trailers), &mut out);
                        wr.write_all(&out).await.map_err(Error::Io)?;
                        return Ok(());
                    }
                }
            },
        }
    }
}

/// Streams the request body while watching for the answer (an instance may answer before it
/// has read everything, e.g. 413). The answer, and whether the whole body went out; `None`
/// when the instance stayed silent too long.
#[allow(clippy::too_many_arguments)]
async fn stream_exchange(
    rd: &mut tokio::net::tcp::ReadHalf<'_>,
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    buf: &mut bytes::BytesMut,
    head: &Bytes,
    body: &mut RequestBody,
    chunked: bool,
    head_request: bool,
    started: &std::sync::atomic::AtomicBool,
    exchange: &Exchange,
    read_timeout: Duration,
    deadline: Option<tokio::time::Instant>,
) -> Option<(Result<Head, Error>, bool)> {
    let wait_for = |now: tokio::time::Instant| {
        let until = now + read_timeout;
        deadline.map_or(until, |d| until.min(d))
    };
    let upload = async {
        wr.write_all(head).await.map_err(Error::Io)?;
        pump(wr, body, chunked, started).await
    };
    let answer = read_head(rd, buf, head_request);
    tokio::pin!(upload, answer);
    let mut uploaded = false;
    let timer = tokio::time::sleep_until(wait_for(tokio::time::Instant::now()));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = &mut upload, if !uploaded => match r {
                Ok(()) => {
                    uploaded = true;
                    timer.as_mut().reset(wait_for(tokio::time::Instant::now()));
                }
                Err(e) => return Some((Err(e), false)),
            },
            h = &mut answer => return Some((h, uploaded)),
            _ = &mut timer => {
                // Still uploading: the clock runs from the body's last progress.
                let now = tokio::time::Instant::now();
                if !uploaded && exchange.idle() < read_timeout && deadline.is_none_or(|d| now < d) {
                    let since = read_timeout.saturating_sub(exchange.idle());
                    let next = wait_for(now).min(now + since.max(Duration::from_millis(10)));
                    timer.as_mut().reset(next);
                } else {
                    return None;
                }
            }
        }
    }
}

/// Sends `out` on `conn` and waits for the response head: at most `read_timeout` of silence
/// (an upload that still makes progress is not silence), and never past `deadline`.
pub async fn send(
    conn: &mut UpConn,
    out: &mut Outgoing,
    exchange: &Exchange,
    read_timeout: Duration,
    deadline: Option<tokio::time::Instant>,
    wheel: &Wheel,
) -> Sent {
    let fd = conn.stream.as_raw_fd();
    let head_request = out.head_request;
    let (mut rd, mut wr) = conn.stream.split();
    let buf = &mut conn.buf;
    let started = std::sync::atomic::AtomicBool::new(false);
    let mut complete = true;
    let wait_for = |now: tokio::time::Instant| {
        let mut until = now + read_timeout;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        until
    };
    let result: Result<Head, Error> = match &mut out.body {
        OutBody::None | OutBody::Full(_) => {
            let exchange_fut = async {
                match &out.body {
                    OutBody::Full(body) => {
                        let mut one = Vec::with_capacity(out.head.len() + body.len());
                        one.extend_from_slice(&out.head);
                        one.extend_from_slice(body);
                        wr.write_all(&one).await.map_err(Error::Io)?;
                    }
                    _ => wr.write_all(&out.head).await.map_err(Error::Io)?,
                }
                read_head(&mut rd, buf, head_request).await
            };
            // On the worker's coarse timer: it almost never fires, and is armed per request.
            let until = wait_for(tokio::time::Instant::from_std(wheel.now())).into_std();
            match timeout(wheel.sleep_until(until), exchange_fut).await {
                Some(r) => r,
                None => return Sent::TimedOut,
            }
        }
        OutBody::Stream { body, chunked } => {
            // Boxed: rare next to bodiless requests, and large.
            let streamed = Box::pin(stream_exchange(
                &mut rd,
                &mut wr,
                buf,
                &out.head,
                body,
                *chunked,
                head_request,
                &started,
                exchange,
                read_timeout,
                deadline,
            ));
            match streamed.await {
                Some((r, uploaded)) => {
                    complete = uploaded;
                    r
                }
                None => return Sent::TimedOut,
            }
        }
    };
    match result {
        Ok(head) => Sent::Head(head, complete),
        Err(e) => {
            let reset = matches!(
                &e,
                Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
            );
            if matches!(e, Error::Eof) {
                conn.unacked_at_eof = unacked_fd(fd).unwrap_or(-1);
            }
            let unread = reset || conn.closed_before_receiving();
            Sent::Failed(Failure {
                error: e.describe(),
                unread,
                intact: !started.load(std::sync::atomic::Ordering::Relaxed),
            })
        }
    }
}

/// The whole proxy in front of scripted instances that answer with odd or broken framing.
#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::time::Duration;

    /// An instance that reads one request head, then writes `pieces` one by one (a pause
    /// between them, so that the proxy reads them separately) and closes.
    fn scripted(pieces: Vec<Vec<u8>>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let pieces = pieces.clone();
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    for p in pieces {
                        if s.write_all(&p).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                });
            }
        });
        addr
    }

    /// Sends one request through a proxy in front of `pieces` and returns the raw answer.
    fn through_proxy(pieces: Vec<&[u8]>, extra_headers: &str) -> String {
        let backend = scripted(pieces.into_iter().map(<[u8]>::to_vec).collect());
        let handle = super::super::server::proxy_to(backend);
        let mut s = std::net::TcpStream::connect(handle.http_addrs[0]).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let req = format!("GET / HTTP/1.1\r\nHost: a.localhost\r\nConnection: close\r\n{extra_headers}\r\n");
        s.write_all(req.as_bytes()).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The body of a chunked answer, unchunked (trailers dropped).
    fn dechunk(body: &str) -> String {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let Some((size, after)) = rest.split_once("\r\n") else { return out };
            let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
            if n == 0 {
                return out;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
    }

    #[test]
    fn chunked_answer_with_extensions_and_trailers_read_in_pieces() {
        let out = through_proxy(
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n",
                b"5;name=val",
                b"ue\r\nhel",
                b"lo\r\n6\r\n world\r",
                b"\n0\r\nx-checksum: 42\r",
                b"\n\r\n",
            ],
            "TE: trailers\r\n",
        );
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let (_, body) = out.split_once("\r\n\r\n").expect("head");
        assert_eq!(dechunk(body), "hello world");
        assert!(body.contains("x-checksum: 42"), "trailers are passed on: {out:?}");
    }

    #[test]
    fn close_delimited_answer_is_passed_on_whole() {
        let out =
            through_proxy(vec![b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nuntil", b" the end", b" of the connection"], "");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let (head, body) = out.split_once("\r\n\r\n").expect("head");
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        assert_eq!(body, "until the end of the connection");
    }

    #[test]
    fn bad_framing_and_oversized_heads_are_a_clean_502() {
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(super::h1::MAX_HEAD + 10));
        let cases: Vec<Vec<&[u8]>> = vec![
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello"],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nhello"],
            vec![b"SSH-2.0-OpenSSH_9.2\r\n\r\n"],
            vec![b"HTTP/1.1 200 OK\r\nContent-Le"],
            vec![big.as_bytes()],
            vec![],
        ];
        for pieces in cases {
            let first = pieces.first().map(|p| String::from_utf8_lossy(&p[..p.len().min(40)]).into_owned());
            let out = through_proxy(pieces, "");
            assert!(out.starts_with("HTTP/1.1 502"), "{first:?} → {out}");
        }
    }

    #[test]
    fn interim_answers_are_skipped() {
        let out = through_proxy(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            ],
            "",
        );
        assert!(out.starts_with("HTTP/1.1 201"), "{out}");
        assert!(out.ends_with("\r\n\r\nok"), "{out}");
    }
}
