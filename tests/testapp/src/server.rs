//! One thread per connection, serving its requests in turn: read a head, frame the body, let
//! the route answer through an [`Exchange`], and keep the connection for the next request when
//! both sides allow it (HTTP/1.1 keep-alive, or HTTP/1.0 with `Connection: keep-alive`).
//!
//! Every answer carries `X-Instance: <hostname>` and prints one access-log line on stdout:
//! `PEER METHOD TARGET STATUS`.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::http::{self, Body, Framing, Head, HeadError, Version};
use crate::routes::{self, After};

/// How long a connection may wait for the next request, or a read or write may stall.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing connection keeps reading what the client still sends (see [`linger_close`]).
const LINGER: Duration = Duration::from_secs(2);

/// Accepts connections until the listener fails, each served on its own thread.
pub fn serve_forever(listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || connection(stream));
            }
            Err(e) => eprintln!("testapp: accept: {e}"),
        }
    }
}

fn connection(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    // Streams and events are written in small pieces that must leave at once.
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (Ok(read_half), Ok(write_half)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let mut reader = BufReader::with_capacity(16 * 1024, read_half);
    let mut writer = BufWriter::with_capacity(16 * 1024, write_half);
    loop {
        let head = match http::read_head(&mut reader) {
            Ok(Some(bytes)) => bytes,
            Ok(None) | Err(HeadError::Broken) => return,
            Err(HeadError::TooLarge) => {
                refuse(&mut writer, &peer, &format!("request head larger than {} bytes", http::MAX_HEAD));
                break;
            }
        };
        let head = match http::parse_head(&head) {
            Ok(head) => head,
            Err(why) => {
                refuse(&mut writer, &peer, &why);
                break;
            }
        };
        let framing = match http::request_framing(&head) {
            Ok(framing) => framing,
            Err(why) => {
                refuse(&mut writer, &peer, &why);
                break;
            }
        };
        // Both Transfer-Encoding and Content-Length: read it as chunked, but do not trust what
        // follows on this connection (RFC 9112 §6.3).
        let smuggling = framing == Framing::Chunked && head.header("content-length").is_some();
        let keep_alive = wants_keep_alive(&head) && !smuggling;
        let mut body = Body::new(&mut reader, framing);
        let mut exchange = Exchange::new(&head, &peer, &mut writer, keep_alive);
        let after = routes::handle(&mut exchange, &mut body);
        let keep_alive = exchange.keep_alive;
        let body_done = body.is_done();
        match after {
            Ok(After::Next) if keep_alive && body_done => {}
            Ok(After::Next) => break,
            Ok(After::Upgraded) | Err(_) => return,
            Ok(After::Reset) => {
                drop((reader, writer));
                abort(stream);
                return;
            }
            Ok(After::Exit(code)) => {
                let _ = writer.flush();
                let _ = io::stdout().flush();
                std::process::exit(code);
            }
        }
    }
    let _ = writer.flush();
    linger_close(&stream, &mut reader);
}

/// Whether the client lets the connection live on after this request (RFC 9112 §9.3).
fn wants_keep_alive(head: &Head) -> bool {
    match head.version {
        Version::Http11 => !head.has_token("connection", "close"),
        Version::Http10 => head.has_token("connection", "keep-alive"),
    }
}

/// Answers a request that cannot be understood: 400, then the connection closes.
fn refuse(out: &mut BufWriter<TcpStream>, peer: &str, why: &str) {
    println!("{peer} - - 400");
    let body = format!("bad request: {why}\n");
    let _ = write!(
        out,
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nX-Instance: {}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        crate::hostname(),
        body.len()
    );
    let _ = out.flush();
}

/// Closes after the last answer without losing it: closing a socket that still has unread
/// input sends a RST, which can destroy the answer before the client reads it. So send a FIN
/// first and read away what comes (bounded in time and size) until the client closes too.
fn linger_close(stream: &TcpStream, reader: &mut BufReader<TcpStream>) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER));
    let _ = io::copy(&mut reader.take(1 << 20), &mut io::sink());
}

/// `struct linger` of socket(7).
#[repr(C)]
struct Linger {
    l_onoff: i32,
    l_linger: i32,
}

/// The same on x86_64 and aarch64 (asm-generic).
const SOL_SOCKET: i32 = 1;
const SO_LINGER: i32 = 13;

/// Closes the connection with a RST instead of a FIN: SO_LINGER with a zero timeout makes the
/// final close(2) abort. `stream` must be the last handle of the socket.
fn abort(stream: TcpStream) {
    let linger = Linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: the fd is open (owned by `stream`, alive for the call); the option value points to
    // a live `struct linger` and the length passed is its size.
    let rc = unsafe {
        crate::setsockopt(
            stream.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            (&linger as *const Linger).cast(),
            std::mem::size_of::<Linger>() as u32,
        )
    };
    if rc != 0 {
        eprintln!("testapp: setsockopt(SO_LINGER): {}", io::Error::last_os_error());
    }
}

/// How the body of an answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimit {
    /// `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// The end of the connection (an HTTP/1.0 client cannot read chunks).
    Close,
    /// No body: HEAD, 204, 304.
    None,
}

/// One request being answered: the head, and the writing side of the connection.
pub struct Exchange<'a> {
    pub head: &'a Head,
    pub peer: &'a str,
    out: &'a mut BufWriter<TcpStream>,
    keep_alive: bool,
    /// Set once the status line has gone out.
    delimit: Option<Delimit>,
    continue_sent: bool,
}

impl<'a> Exchange<'a> {
    fn new(head: &'a Head, peer: &'a str, out: &'a mut BufWriter<TcpStream>, keep_alive: bool) -> Exchange<'a> {
        Exchange { head, peer, out, keep_alive, delimit: None, continue_sent: false }
    }

    /// Makes this the connection's last answer (`Connection: close`); call before answering.
    pub fn close_after(&mut self) {
        self.keep_alive = false;
    }

    /// Sends `100 Continue` if the client waits for it before sending a body (RFC 9110 §10.1.1).
    pub fn continue_if_expected(&mut self) -> io::Result<()> {
        if self.continue_sent || self.head.version != Version::Http11 || !self.head.has_token("expect", "100-continue")
        {
            return Ok(());
        }
        self.continue_sent = true;
        self.out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        self.out.flush()
    }

    /// Logs the access line (also for answers that are not HTTP, like a reset).
    pub fn log(&self, outcome: &str) {
        println!("{} {} {} {outcome}", self.peer, self.head.method, self.head.target);
    }

    /// A whole `text/plain` answer.
    pub fn reply(&mut self, status: u16, body: impl AsRef<[u8]>) -> io::Result<()> {
        self.reply_with(status, &[], body.as_ref())
    }

    /// A whole `text/plain` answer with extra header fields.
    pub fn reply_with(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> io::Result<()> {
        self.start(status, "text/plain", headers, Some(body.len() as u64))?;
        self.send(body)?;
        self.finish(&[])
    }

    /// Sends the status line and header fields. The body then goes with [`Exchange::send`] and
    /// ends with [`Exchange::finish`]: `Content-Length` if `length` is given, else chunked (or
    /// until the connection closes, for an HTTP/1.0 client).
    pub fn start(
        &mut self,
        status: u16,
        content_type: &str,
        headers: &[(&str, &str)],
        length: Option<u64>,
    ) -> io::Result<()> {
        let bodiless = self.head.method == "HEAD" || status == 204 || status == 304;
        let delimit = match length {
            _ if bodiless => Delimit::None,
            Some(_) => Delimit::Length,
            None if self.head.version == Version::Http11 => Delimit::Chunked,
            None => Delimit::Close,
        };
        if delimit == Delimit::Close {
            self.keep_alive = false;
        }
        self.delimit = Some(delimit);
        self.log(&status.to_string());

        let out = &mut *self.out;
        write!(out, "HTTP/1.1 {status} {}\r\n", http::reason(status))?;
        if !content_type.is_empty() && status != 204 {
            write!(out, "Content-Type: {content_type}\r\n")?;
        }
        write!(out, "X-Instance: {}\r\n", crate::hostname())?;
        for (name, value) in headers {
            write!(out, "{name}: {value}\r\n")?;
        }
        // A HEAD answer announces the framing a GET would get.
        if status != 204 && status != 304 {
            match length {
                Some(len) => write!(out, "Content-Length: {len}\r\n")?,
                None if self.head.version == Version::Http11 => out.write_all(b"Transfer-Encoding: chunked\r\n")?,
                None => {}
            }
        }
        if !self.keep_alive {
            out.write_all(b"Connection: close\r\n")?;
        } else if self.head.version == Version::Http10 {
            out.write_all(b"Connection: keep-alive\r\n")?;
        }
        out.write_all(b"\r\n")
    }

    /// Whether the answer started has a body to send (not HEAD, 204 or 304).
    pub fn has_body(&self) -> bool {
        !matches!(self.delimit, Some(Delimit::None))
    }

    /// Sends body bytes: one chunk when the answer is chunked.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.send_from(bytes.len() as u64, &mut &bytes[..])
    }

    /// Sends `len` body bytes read from `data` (one chunk when chunked) without holding them.
    pub fn send_from(&mut self, len: u64, data: &mut impl Read) -> io::Result<()> {
        match self.delimit {
            Some(Delimit::Chunked) => http::write_chunk(self.out, len, data),
            Some(Delimit::Length | Delimit::Close) => http::copy_exactly(data, self.out, len),
            Some(Delimit::None) => Ok(()),
            None => Err(io::Error::other("body sent before the head")),
        }
    }

    /// Pushes what was sent so far to the client.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Ends the body (with `trailers` when chunked; they are dropped otherwise) and flushes.
    pub fn finish(&mut self, trailers: &[(&str, &str)]) -> io::Result<()> {
        if self.delimit == Some(Delimit::Chunked) {
            http::write_last_chunk(self.out, trailers)?;
        }
        self.out.flush()
    }

    /// Answers `101 Switching Protocols` with `headers`; the connection then belongs to the new
    /// protocol, written through the returned writer.
    pub fn switch_protocols(&mut self, headers: &[(&str, &str)]) -> io::Result<&mut BufWriter<TcpStream>> {
        self.log("101");
        self.keep_alive = false;
        self.delimit = Some(Delimit::None);
        write!(self.out, "HTTP/1.1 101 Switching Protocols\r\nX-Instance: {}\r\n", crate::hostname())?;
        for (name, value) in headers {
            write!(self.out, "{name}: {value}\r\n")?;
        }
        self.out.write_all(b"\r\n")?;
        self.out.flush()?;
        Ok(self.out)
    }
}
