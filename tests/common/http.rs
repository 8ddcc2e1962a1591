//! Minimal HTTP/1.1 client over `std::net::TcpStream`: one request per connection
//! (`Connection: close`), explicit Host header, bounded by timeouts. Enough to talk to the
//! proxy, the registry and instances without pulling an HTTP stack into the tests.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET path` on `addr` (`127.0.0.1:PORT`) with `Host: host_header`. Panics on a transport error
/// (connection refused, timeout, malformed answer); HTTP error statuses are returned.
pub fn http_get(addr: &str, host_header: &str, path: &str) -> (u16, String) {
    try_http_get(addr, host_header, path)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} (Host: {host_header}) failed: {e}"))
}

/// Like [`http_get`], polling every 200 ms until `accept(status, body)` holds; panics with the
/// last answer (or error) after `timeout`.
pub fn http_get_retry(
    addr: &str,
    host_header: &str,
    path: &str,
    timeout: Duration,
    accept: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match try_http_get(addr, host_header, path) {
            Ok((status, body)) if accept(status, &body) => return (status, body),
            Ok((status, body)) => format!("last answer: {status} {body:?}"),
            Err(e) => format!("last error: {e}"),
        };
        if Instant::now() >= deadline {
            panic!(
                "GET http://{addr}{path} (Host: {host_header}) gave no acceptable answer \
                 within {timeout:?}; {last}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` on `addr` with `Host: host_header`; `Err` on any transport or framing error.
pub fn try_http_get(addr: &str, host_header: &str, path: &str) -> std::io::Result<(u16, String)> {
    let sockaddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad address {addr}")))?;
    let mut stream = TcpStream::connect_timeout(&sockaddr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: deliverous-tests\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid(format!("no end of headers in {} bytes", raw.len())))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = &raw[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if name == "content-length" {
                if let Ok(len) = value.parse::<usize>() {
                    body = &body[..len.min(body.len())];
                }
            }
        }
    }
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| invalid("truncated chunk size".into()))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err(invalid("truncated chunk".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((s, b.as_str()), (200, "abc"));
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, b.as_str()), (404, "abcde"));
    }
}

/// A response read by [`Conn`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Trailer fields after a chunked body.
    pub trailers: Vec<(String, String)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive HTTP/1.1 connection: several requests in turn, bodies framed by
/// `Content-Length` or chunked (trailers kept).
pub struct Conn {
    reader: std::io::BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: &str) -> std::io::Result<Conn> {
        let sockaddr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad address {addr}")))?;
        let stream = TcpStream::connect_timeout(&sockaddr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn { reader: std::io::BufReader::new(stream) })
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    /// Sends a request (with `Content-Length` when `body` is not empty) and reads the answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: deliverous-tests\r\n");
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        s.flush()?;
        self.read_response(method == "HEAD")
    }

    /// Reads one response (skipping `100 Continue`).
    pub fn read_response(&mut self, head_only: bool) -> std::io::Result<Response> {
        use std::io::BufRead;
        loop {
            let (status, headers) = self.read_head()?;
            if status == 100 {
                continue;
            }
            let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let mut body = Vec::new();
            let mut trailers = Vec::new();
            if head_only || status == 204 || status == 304 || status == 101 {
            } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
                loop {
                    let mut line = String::new();
                    self.reader.read_line(&mut line)?;
                    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                        .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
                    if size == 0 {
                        loop {
                            let mut t = String::new();
                            self.reader.read_line(&mut t)?;
                            let t = t.trim_end();
                            if t.is_empty() {
                                break;
                            }
                            if let Some((n, v)) = t.split_once(':') {
                                trailers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
                            }
                        }
                        break;
                    }
                    let start = body.len();
                    body.resize(start + size, 0);
                    self.reader.read_exact(&mut body[start..])?;
                    let mut crlf = [0u8; 2];
                    self.reader.read_exact(&mut crlf)?;
                }
            } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
                body.resize(len, 0);
                self.reader.read_exact(&mut body)?;
            } else {
                self.reader.read_to_end(&mut body)?;
            }
            return Ok(Response { status, headers, body, trailers });
        }
    }

    /// Reads a status line and headers.
    pub fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        use std::io::BufRead;
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((n, v)) = line.split_once(':') {
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Ok((status, headers))
    }

    /// The rest of the stream's buffered reader, for protocols after an upgrade.
    pub fn reader(&mut self) -> &mut std::io::BufReader<TcpStream> {
        &mut self.reader
    }
}
