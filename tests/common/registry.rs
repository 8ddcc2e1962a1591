//! A throw-away OCI registry (Debian's `docker-registry`) on a free loopback port, storing
//! into a temp dir. Plain HTTP: clients must treat it as insecure (it is on 127.0.0.1).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, tail, try_http_get};

const BINARY: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Child,
    addr: String,
    /// User and password every request needs (htpasswd), if any.
    login: Option<(String, String)>,
    log: PathBuf,
    // Dropped last (after the process is gone): field order matters.
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts the registry and waits until `GET /v2/` answers. Panics with its log otherwise.
    pub fn start() -> Registry {
        Registry::start_inner(None, None)
    }

    /// A registry inside `netns`, listening on its veth address (the host reaches it there; so
    /// does what runs in the namespace). Clients must treat it as insecure (plain HTTP).
    pub fn start_in_netns(netns: &super::Netns) -> Registry {
        Registry::start_inner(None, Some(netns))
    }

    /// A registry that refuses every request without this user and password (htpasswd).
    pub fn start_with_login(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user.to_string(), password.to_string())), None)
    }

    fn start_inner(login: Option<(String, String)>, netns: Option<&super::Netns>) -> Registry {
        assert!(
            std::path::Path::new(BINARY).exists(),
            "{BINARY} is missing: apt-get install docker-registry (scripts/test does it)"
        );
        // Named without "dlv": the leaks tool must not report a registry other tests share.
        let dir = tempfile::Builder::new().prefix("oci-registry-").tempdir().expect("create registry temp dir");
        let log = dir.path().join("registry.log");
        let auth = match &login {
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("write htpasswd");
                format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", htpasswd.display())
            }
            None => String::new(),
        };
        // The port is free when picked but could be taken before the registry binds it: retry.
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let ip = netns.map(|n| n.inner_ip()).unwrap_or("127.0.0.1");
            let addr = format!("{ip}:{}", free_port());
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {addr}\n{auth}",
                    dir.path().join("storage").display()
                ),
            )
            .expect("write registry config");
            let logfile = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open registry log");
            let mut cmd = Command::new(BINARY);
            if let Some(netns) = netns {
                super::netns::enter_in_child(&mut cmd, &netns.path());
            }
            let mut child = cmd
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(logfile.try_clone().expect("dup log fd"))
                .stderr(logfile)
                .spawn()
                .expect("spawn docker-registry");
            match wait_ready(&mut child, &addr, Duration::from_secs(15)) {
                Ok(()) => return Registry { child, addr, login, log, dir },
                Err(e) => {
                    last_error = e;
                    // Only the PID we started.
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!("docker-registry did not come up: {last_error}\n--- registry log ---\n{}", tail(&log, 50));
    }

    /// `127.0.0.1:PORT`, the registry part of image references (`{addr}/demo/httpd:1`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `user:password` if the registry needs a login.
    pub fn login(&self) -> Option<String> {
        self.login.as_ref().map(|(u, p)| format!("{u}:{p}"))
    }

    /// Full reference of `repo_tag` (`demo/httpd:1`) in this registry.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{}", self.addr, repo_tag)
    }

    /// The registry's log (for diagnostics).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Only the PID we started.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- registry {} log (last 20 lines) ---\n{}", self.addr, tail(&self.log, 20));
        }
    }
}

fn wait_ready(child: &mut Child, addr: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("docker-registry exited early with {status}"));
        }
        let last = match try_http_get(addr, addr, "/v2/") {
            // 401: up, and asking for the login it was configured with.
            Ok((200 | 401, _)) => return Ok(()),
            Ok((status, body)) => format!("GET /v2/ answered {status}: {body}"),
            Err(e) => format!("GET /v2/ failed: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
