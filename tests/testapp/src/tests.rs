//! End-to-end checks of the server in this process: it listens on 127.0.0.1 (a port the kernel
//! picks) and a hand-written client talks to it byte by byte, as a proxy would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::digest::Fnv1a64;
use crate::routes::BIG_PATTERN;
use crate::websocket::{self, tests::client_frame, BINARY, CLOSE, PING, PONG, TEXT};

/// The server, started once for all tests.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        std::thread::spawn(move || crate::server::serve_forever(listener));
        addr
    })
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Sizes of the chunks, when chunked.
    chunks: Vec<usize>,
    trailers: Vec<(String, String)>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect() -> Client {
        let stream = TcpStream::connect(server()).expect("connect to the server");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    fn send(&mut self, raw: impl AsRef<[u8]>) {
        self.stream.write_all(raw.as_ref()).expect("send");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a line");
        assert!(line.ends_with("\r\n"), "line without CRLF: {line:?}");
        line.truncate(line.len() - 2);
        line
    }

    fn fields(&mut self) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                return fields;
            }
            let (name, value) = line.split_once(": ").unwrap_or_else(|| panic!("bad field line {line:?}"));
            fields.push((name.to_string(), value.to_string()));
        }
    }

    /// Reads one answer to a request with method `method`.
    fn answer(&mut self, method: &str) -> Answer {
        let status_line = self.line();
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
        let headers = self.fields();
        let mut answer = Answer { status, headers, body: Vec::new(), chunks: Vec::new(), trailers: Vec::new() };
        if method == "HEAD" || status == 204 || status == 304 || status == 101 {
            return answer;
        }
        if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line(), 16).expect("hex chunk size");
                if size == 0 {
                    answer.trailers = self.fields();
                    return answer;
                }
                let mut chunk = vec![0; size];
                self.reader.read_exact(&mut chunk).unwrap();
                answer.body.extend(chunk);
                answer.chunks.push(size);
                assert_eq!(self.line(), "", "chunk data longer than its size");
            }
        } else if let Some(len) = answer.header("content-length") {
            answer.body = vec![0; len.parse().unwrap()];
            self.reader.read_exact(&mut answer.body).unwrap();
        } else {
            self.reader.read_to_end(&mut answer.body).unwrap();
        }
        answer
    }

    fn get(&mut self, target: &str) -> Answer {
        self.send(format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"));
        self.answer("GET")
    }

    /// Asserts the server closed the connection (after what was read).
    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).expect("read to the end");
        assert!(rest.is_empty(), "bytes after the last answer: {:?}", String::from_utf8_lossy(&rest));
    }
}

#[test]
fn keep_alive_serves_several_and_pipelined_requests_until_close() {
    let mut c = Client::connect();
    let a = c.get("/hostname");
    assert_eq!((a.status, a.text()), (200, format!("{}\n", crate::hostname())));
    assert_eq!(a.header("x-instance"), Some(crate::hostname()));
    assert_eq!(a.header("connection"), None);

    // Two requests in one write; HEAD gets the length of a GET but no body.
    c.send("GET /status?code=201 HTTP/1.1\r\nHost: t\r\n\r\nHEAD /big?mb=1 HTTP/1.1\r\nHost: t\r\n\r\n");
    let a = c.answer("GET");
    assert_eq!((a.status, a.text().as_str()), (201, "status 201\n"));
    let a = c.answer("HEAD");
    assert_eq!((a.status, a.header("content-length")), (200, Some("1048576")));

    c.send("GET /headers HTTP/1.1\r\nHost: t\r\nX-Test:  A b \r\nConnection: close\r\n\r\n");
    let a = c.answer("GET");
    assert_eq!(a.header("connection"), Some("close"));
    let local = c.stream.local_addr().unwrap();
    assert_eq!(a.text(), format!("host: t\nx-test: A b\nconnection: close\npeer={local}\n"));
    c.assert_closed();
}

#[test]
fn http_1_0_closes_unless_asked_to_keep_alive() {
    let mut c = Client::connect();
    c.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let a = c.answer("GET");
    assert_eq!((a.status, a.header("connection")), (200, Some("keep-alive")));
    // No chunks for HTTP/1.0: the body ends with the connection, trailers are dropped.
    c.send("GET /trailers HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let a = c.answer("GET");
    assert_eq!((a.header("connection"), a.header("transfer-encoding")), (Some("close"), None));
    assert_eq!(a.text(), "hello\n");

    let mut c = Client::connect();
    c.send("GET /env/PATH HTTP/1.0\r\n\r\n");
    let a = c.answer("GET");
    assert_eq!((a.status, a.header("connection")), (200, Some("close")));
    c.assert_closed();
}

#[test]
fn chunked_upload_after_100_continue_is_counted_and_hashed() {
    let mut c = Client::connect();
    c.send("POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n");
    let mut interim = [0u8; 25];
    c.reader.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");

    let mut hash = Fnv1a64::new();
    let mut total = 0;
    for (i, size) in [1usize, 70_000, 3, 1 << 20, 0x1000].into_iter().enumerate() {
        let chunk: Vec<u8> = (0..size).map(|j| (i * 7 + j) as u8).collect();
        hash.update(&chunk);
        total += size;
        c.send(format!("{size:x};ext=1\r\n"));
        c.send(&chunk);
        c.send("\r\n");
    }
    c.send("0\r\nX-Ignored: yes\r\n\r\n");
    let a = c.answer("POST");
    assert_eq!((a.status, a.text()), (200, format!("bytes={total} fnv={:016x}\n", hash.finish())));

    // Then a Content-Length upload and an empty one on the same connection.
    c.send("PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nfoobar");
    assert_eq!(c.answer("PUT").text(), "bytes=6 fnv=85944171f73967e8\n");
    c.send("POST /upload HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.answer("POST").text(), "bytes=0 fnv=cbf29ce484222325\n");
    assert_eq!(c.get("/upload").status, 405);
}

#[test]
fn bodies_sent_to_other_routes_are_drained() {
    let mut c = Client::connect();
    c.send("POST /headers HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    c.send("POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(c.answer("POST").status, 200);
    assert_eq!(c.answer("POST").status, 405, "the routes about the instance stay GET-only");
    assert_eq!(c.get("/slow?ms=0").text(), "slept 0\n");
}

#[test]
fn malformed_requests_get_400_and_a_close() {
    let too_long = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024));
    let cases = [
        "BLAH\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nno colon\r\n\r\n".into(),
        "POST /upload HTTP/1.1\r\nContent-Length: x\r\n\r\n".into(),
        "POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n".into(),
        "POST /headers HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n".into(),
        too_long,
    ];
    for raw in cases {
        let mut c = Client::connect();
        c.send(&raw);
        let a = c.answer("GET");
        assert_eq!((a.status, a.header("connection")), (400, Some("close")), "{}", &raw[..raw.len().min(60)]);
        assert_eq!(a.header("x-instance"), Some(crate::hostname()));
        c.assert_closed();
    }
}

#[test]
fn trailers_follow_the_last_chunk() {
    let mut c = Client::connect();
    let a = c.get("/trailers");
    assert_eq!(a.header("trailer"), Some("X-Checksum, X-Count"));
    assert_eq!(a.text(), "hello\n");
    let trailers = [("X-Checksum".to_string(), "abc123".to_string()), ("X-Count".into(), "1".into())];
    assert_eq!(a.trailers, trailers);
}

#[test]
fn events_and_streams_arrive_in_chunks() {
    let mut c = Client::connect();
    let started = Instant::now();
    let a = c.get("/sse?n=3&ms=20");
    assert!(started.elapsed() >= Duration::from_millis(40));
    assert_eq!((a.header("content-type"), a.header("cache-control")), (Some("text/event-stream"), Some("no-cache")));
    assert_eq!(a.text(), "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n");
    assert_eq!(a.chunks.len(), 3);

    let a = c.get("/stream?chunks=4&size=100000");
    assert_eq!(a.chunks, [100_000; 4]);
    assert!(a.body.iter().all(|&b| b == b'x'));
    assert!(c.get("/stream?chunks=2&size=0").body.is_empty());
    assert_eq!(c.get("/stream?chunks=x&size=1").status, 400);
}

#[test]
fn big_answers_repeat_the_pattern() {
    let mut c = Client::connect();
    let a = c.get("/big?mb=3");
    assert_eq!(a.header("content-length"), Some("3145728"));
    assert!(a.body.chunks(64).all(|piece| piece == BIG_PATTERN));
    assert_eq!(c.get("/big?mb=99999999999999").status, 400);
}

#[test]
fn status_slow_and_health() {
    let mut c = Client::connect();
    for code in [200, 302, 404, 418, 503] {
        let a = c.get(&format!("/status?code={code}"));
        assert_eq!((a.status, a.text()), (code, format!("status {code}\n")));
    }
    let a = c.get("/status?code=204");
    assert_eq!((a.status, a.header("content-length")), (204, None));
    assert_eq!(c.get("/status?code=100").status, 400);
    let started = Instant::now();
    assert_eq!(c.get("/slow?ms=100").text(), "slept 100\n");
    assert!(started.elapsed() >= Duration::from_millis(100));

    // The only test that touches the process-wide health flag.
    assert_eq!(c.get("/health").text(), "ok\n");
    assert_eq!(c.get("/health/set?ok=0").status, 200);
    let a = c.get("/health");
    assert_eq!((a.status, a.text().as_str()), (503, "unhealthy\n"));
    assert_eq!(c.get("/health/set?ok=maybe").status, 400);
    c.get("/health/set?ok=1");
    assert_eq!(c.get("/health").status, 200);
}

#[test]
fn reset_aborts_the_connection() {
    let mut c = Client::connect();
    c.send("GET /reset HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut buf = [0u8; 16];
    let err = c.reader.read(&mut buf).expect_err("a RST, not an answer or a FIN");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

/// Reads one server frame: (fin, opcode, payload).
fn server_frame(c: &mut Client) -> (bool, u8, Vec<u8>) {
    let head = websocket::read_frame_head(&mut c.reader).unwrap().expect("a frame");
    assert_eq!(head.mask, None, "server frames are not masked");
    let mut payload = vec![0; head.len as usize];
    c.reader.read_exact(&mut payload).unwrap();
    (head.fin, head.opcode, payload)
}

#[test]
fn websocket_echoes_until_closed() {
    let mut c = Client::connect();
    // Without the upgrade headers: a plain 400, the connection stays usable.
    assert_eq!(c.get("/ws").status, 400);

    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut handshake = b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    // A frame right behind the handshake, before the 101 came back.
    handshake.extend(client_frame(true, TEXT, b"Hello", mask));
    c.send(handshake);
    let a = c.answer("GET");
    assert_eq!(a.status, 101);
    assert_eq!(a.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    assert_eq!((a.header("upgrade"), a.header("connection")), (Some("websocket"), Some("Upgrade")));
    assert_eq!(server_frame(&mut c), (true, TEXT, b"Hello".to_vec()));

    let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    c.send(client_frame(true, BINARY, &big, mask));
    assert_eq!(server_frame(&mut c), (true, BINARY, big));
    c.send(client_frame(true, PING, b"are you there", mask));
    assert_eq!(server_frame(&mut c), (true, PONG, b"are you there".to_vec()));
    c.send(client_frame(true, CLOSE, &[0x03, 0xe8, b'b', b'y', b'e'], mask));
    assert_eq!(server_frame(&mut c), (true, CLOSE, vec![0x03, 0xe8]));
    c.assert_closed();

    let mut c = Client::connect();
    c.send(
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    let a = c.answer("GET");
    assert_eq!((a.status, a.header("sec-websocket-version")), (426, Some("13")));
}
