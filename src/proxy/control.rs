//! The proxy process's control socket: the daemon feeds it route tables, asks it to drain an
//! instance, reads its metrics, takes copies of its listening sockets, and retires it when a
//! newer proxy has taken over. One JSON request per line, one JSON answer per line; listening
//! sockets travel as `SCM_RIGHTS` with the answer that lists them.
//!
//! The proxy must not depend on the daemon: everything here is asked of it, and a daemon that
//! goes away (crash, restart, upgrade) leaves it serving with the last table it got.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::routes::{RouteConfig, RouteTable};

/// Largest request or answer line (a route table of many apps fits well within it).
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello,
    Routes {
        config: RouteConfig,
    },
    Drain {
        ip: IpAddr,
        timeout_ms: u64,
    },
    Metrics,
    /// Requests served per backend, for per-instance figures.
    Backends,
    Listeners,
    Retire,
}

/// Requests a backend (an instance at an address) has been sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendCount {
    pub instance: String,
    pub addr: SocketAddr,
    pub requests: u64,
}

/// What a proxy says about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Hello {
    pub pid: u32,
    pub version: String,
    /// `dev:inode` of the executable it runs: a different one after the binary was upgraded.
    pub exe: String,
    /// The settings it was started with, as the daemon summarised them.
    pub fingerprint: String,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
}

/// A listening socket, as passed between processes (the descriptor travels alongside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerDesc {
    pub addr: SocketAddr,
    pub https: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hello: Option<Hello>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerDesc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendCount>,
}

/// `dev:inode` of the running executable.
pub fn exe_identity() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/exe") {
        Ok(m) => format!("{}:{}", m.dev(), m.ino()),
        Err(_) => String::new(),
    }
}

/// What the proxy process serves its control socket with.
pub struct ControlState {
    pub table: Arc<RouteTable>,
    pub hello: Hello,
    /// Copies of the listening sockets, handed to whoever asks (the daemon keeps them so that
    /// a proxy that dies or is replaced loses no queued connection).
    pub listeners: Vec<(ListenerDesc, OwnedFd)>,
    /// Set when the daemon retires this proxy.
    pub retire: watch::Sender<bool>,
}

/// Serves the control socket until the proxy is retired.
pub async fn serve(listener: UnixListener, state: Arc<ControlState>) {
    let mut retired = state.retire.subscribe();
    loop {
        let stream = tokio::select! {
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("proxy control socket: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = super::set(&mut retired) => return,
        };
        tokio::spawn(session(stream, state.clone()));
    }
}

async fn session(stream: UnixStream, state: Arc<ControlState>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64).read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request = match serde_json::from_str::<Request>(&line) {
            Ok(r) => r,
            Err(e) => {
                let answer = Answer { error: Some(format!("invalid request: {e}")), ..Default::default() };
                if write_answer(reader.get_mut(), &answer).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let answer = match request {
            Request::Hello => Answer { hello: Some(state.hello.clone()), ..Default::default() },
            Request::Routes { config } => {
                state.table.publish(config);
                Answer::default()
            }
            Request::Drain { ip, timeout_ms } => {
                let left = state.table.drain(ip, Duration::from_millis(timeout_ms)).await;
                Answer { left: Some(left), ..Default::default() }
            }
            Request::Metrics => Answer { text: Some(super::metrics::render(&state.table)), ..Default::default() },
            Request::Backends => {
                let backends = state
                    .table
                    .snapshot()
                    .backends
                    .iter()
                    .map(|b| BackendCount {
                        instance: b.instance.clone(),
                        addr: b.addr,
                        requests: b.metrics.requests(),
                    })
                    .collect();
                Answer { backends, ..Default::default() }
            }
            Request::Listeners => {
                let answer = Answer { listeners: state.listeners.iter().map(|l| l.0).collect(), ..Default::default() };
                let fds: Vec<RawFd> = state.listeners.iter().map(|l| l.1.as_raw_fd()).collect();
                let Ok(mut bytes) = serde_json::to_vec(&answer) else { return };
                bytes.push(b'\n');
                let stream = reader.get_mut();
                if stream.writable().await.is_err() {
                    return;
                }
                let sent =
                    stream.try_io(tokio::io::Interest::WRITABLE, || send_with_fds(stream.as_raw_fd(), &bytes, &fds));
                if let Err(e) = sent {
                    tracing::warn!("proxy control: cannot pass the listening sockets: {e}");
                    return;
                }
                continue;
            }
            Request::Retire => {
                tracing::info!("retired by the daemon: no longer accepting, finishing open connections");
                let _ = state.retire.send(true);
                Answer::default()
            }
        };
        if write_answer(reader.get_mut(), &answer).await.is_err() {
            return;
        }
    }
}

async fn write_answer(stream: &mut UnixStream, answer: &Answer) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(answer).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await
}

/// Sends `data` with `fds` attached (`SCM_RIGHTS`).
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)?;
    if n < data.len() {
        // The descriptors went with the first part; the rest is plain bytes.
        // SAFETY: `fd` is a connected socket the caller owns for the duration of the call.
        let mut rest = &data[n..];
        while !rest.is_empty() {
            let w = sendmsg::<()>(fd, &[IoSlice::new(rest)], &[], MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)?;
            rest = &rest[w..];
        }
    }
    Ok(())
}

/// One request on a fresh connection to the control socket at `path`, and its answer.
pub async fn call(path: &Path, request: &Request, timeout: Duration) -> std::io::Result<Answer> {
    let work = async {
        let stream = UnixStream::connect(path).await?;
        let mut reader = BufReader::new(stream);
        let mut bytes = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        reader.get_mut().write_all(&bytes).await?;
        let mut line = String::new();
        if (&mut reader).take(MAX_LINE as u64).read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the proxy closed the connection"));
        }
        let answer: Answer = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        match answer.error {
            Some(e) => Err(std::io::Error::other(e)),
            None => Ok(answer),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the proxy did not answer")))
}

/// Asks the proxy at `path` for copies of its listening sockets (blocking; run it off the async
/// threads).
pub fn take_listeners(path: &Path, timeout: Duration) -> std::io::Result<Vec<(ListenerDesc, OwnedFd)>> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut bytes = serde_json::to_vec(&Request::Listeners).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)?;
    let (data, fds) = recv_line_with_fds(&stream)?;
    let answer: Answer = serde_json::from_slice(&data).map_err(std::io::Error::other)?;
    if let Some(e) = answer.error {
        return Err(std::io::Error::other(e));
    }
    if answer.listeners.len() != fds.len() {
        return Err(std::io::Error::other(format!(
            "the proxy listed {} listening sockets but passed {}",
            answer.listeners.len(),
            fds.len()
        )));
    }
    Ok(answer.listeners.into_iter().zip(fds).collect())
}

/// Reads one line and the descriptors that came with it (blocking).
pub fn recv_line_with_fds(stream: &std::os::unix::net::UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut data = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut space = nix::cmsg_space!([RawFd; 64]);
    while !data.ends_with(b"\n") {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in this process for us.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the peer closed the connection"));
        }
        data.extend_from_slice(&buf[..n]);
        if data.len() > MAX_LINE {
            return Err(std::io::Error::other("answer too long"));
        }
    }
    Ok((data, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_travel_with_their_descriptions_and_requests_are_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxy.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let (retire, _) = watch::channel(false);
        let state = Arc::new(ControlState {
            table: Arc::new(RouteTable::default()),
            hello: Hello { pid: 7, fingerprint: "f".into(), http: vec![addr], ..Default::default() },
            listeners: vec![(ListenerDesc { addr, https: false }, OwnedFd::from(tcp))],
            retire,
        });
        let server = tokio::spawn(serve(UnixListener::bind(&path).expect("bind control"), state.clone()));

        let hello = call(&path, &Request::Hello, Duration::from_secs(5)).await.expect("hello");
        assert_eq!(hello.hello.map(|h| (h.pid, h.fingerprint)), Some((7, "f".to_string())));
        let bad = call(&path, &Request::Drain { ip: [10, 0, 0, 1].into(), timeout_ms: 10 }, Duration::from_secs(5))
            .await
            .expect("drain");
        assert_eq!(bad.left, Some(0));

        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || take_listeners(&p, Duration::from_secs(5)))
            .await
            .expect("join")
            .expect("listeners");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, ListenerDesc { addr, https: false });
        // The copy is the same listening socket: a connection to it is accepted through the copy.
        let copy = std::net::TcpListener::from(got[0].1.try_clone().expect("dup"));
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        copy.accept().expect("accept through the copy");

        call(&path, &Request::Retire, Duration::from_secs(5)).await.expect("retire");
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").expect("join");
    }
}
