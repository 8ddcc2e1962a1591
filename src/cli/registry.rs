//! `deliverous registry login|logout HOST`: checks credentials against the registry and keeps
//! them in the daemon's auth file (0600). Runs locally, without the daemon: the daemon reads the
//! file again at every pull.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use deliverous_images::{
    check_login, list_credentials, remove_credentials, store_credentials, LoginCheck, DEFAULT_AUTH_FILE,
};

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Check credentials for a registry and save them for pulls.
    #[command(after_help = "Examples:\n  \
        deliverous registry login ghcr.io -u octocat            (asks for the password or token)\n  \
        echo \"$TOKEN\" | deliverous registry login registry.example.com -u ci --password-stdin")]
    Login {
        /// Registry host, e.g. ghcr.io, registry.example.com:5000 or docker.io.
        host: String,
        /// User name (asked for when omitted on a terminal).
        #[arg(short, long)]
        username: Option<String>,
        /// Read the password or token from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Talk plain HTTP to this registry (loopback registries always are).
        #[arg(long)]
        insecure: bool,
        /// Where credentials are kept; the daemon's --auth-file.
        #[arg(long, env = "DELIVEROUS_AUTH_FILE", default_value = DEFAULT_AUTH_FILE)]
        auth_file: PathBuf,
    },
    /// The registries credentials are saved for, with their user names (never the secrets).
    #[command(after_help = "Examples:\n  deliverous registry ls\n  deliverous registry ls --json")]
    Ls {
        /// Print them as a JSON array of {host, username}.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "DELIVEROUS_AUTH_FILE", default_value = DEFAULT_AUTH_FILE)]
        auth_file: PathBuf,
    },
    /// Forget the credentials saved for a registry.
    #[command(after_help = "Example:\n  deliverous registry logout ghcr.io")]
    Logout {
        host: String,
        #[arg(long, env = "DELIVEROUS_AUTH_FILE", default_value = DEFAULT_AUTH_FILE)]
        auth_file: PathBuf,
    },
}

pub async fn run_registry(cmd: RegistryCommand) -> ExitCode {
    match cmd {
        RegistryCommand::Login { host, username, password_stdin, insecure, auth_file } => {
            login(&host, username, password_stdin, insecure, &auth_file).await
        }
        RegistryCommand::Ls { json, auth_file } => match list_credentials(&auth_file) {
            Ok(entries) if json => {
                let list: Vec<_> =
                    entries.iter().map(|(host, user)| serde_json::json!({"host": host, "username": user})).collect();
                super::print_json(&serde_json::Value::from(list));
                ExitCode::SUCCESS
            }
            Ok(entries) => {
                let rows = entries.into_iter().map(|(host, user)| vec![host, user]).collect();
                super::table(&["REGISTRY", "USERNAME"], rows);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
        RegistryCommand::Logout { host, auth_file } => match remove_credentials(&auth_file, &host) {
            Ok(true) => {
                println!("removed the credentials for {host} from {}", auth_file.display());
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("no credentials for {host} in {}", auth_file.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
    }
}

async fn login(host: &str, username: Option<String>, password_stdin: bool, insecure: bool, file: &Path) -> ExitCode {
    let interactive = std::io::stdin().is_terminal();
    let username = match username {
        Some(u) => u,
        None if interactive && !password_stdin => match prompt("Username: ", true) {
            Ok(u) => u,
            Err(e) => return fail(&format!("cannot read the user name: {e}")),
        },
        None => return usage("give the user name with -u/--username"),
    };
    let secret = if password_stdin {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
            return fail(&format!("cannot read the password from standard input: {e}"));
        }
        line.trim_end_matches(['\n', '\r']).to_string()
    } else if interactive {
        match prompt("Password: ", false) {
            Ok(p) => p,
            Err(e) => return fail(&format!("cannot read the password: {e}")),
        }
    } else {
        return usage("no terminal to ask the password on: pipe it in with --password-stdin");
    };
    if secret.is_empty() {
        return usage("the password is empty");
    }
    match check_login(host, &username, &secret, insecure).await {
        Ok(check) => {
            if let Err(e) = store_credentials(file, host, &username, &secret) {
                return fail(&e.to_string());
            }
            match check {
                LoginCheck::Accepted => println!("login succeeded; credentials for {host} saved in {}", file.display()),
                LoginCheck::NotRequired => println!(
                    "{host} lets anyone pull, so the credentials were not checked; saved in {} anyway",
                    file.display()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// Reads one line from the terminal, with echo off unless `echo`.
fn prompt(label: &str, echo: bool) -> std::io::Result<String> {
    eprint!("{label}");
    std::io::stderr().flush()?;
    let fd = libc::STDIN_FILENO;
    let saved = if echo { None } else { Some(EchoOff::new(fd)?) };
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    drop(saved);
    if !echo {
        eprintln!();
    }
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Turns terminal echo off until dropped.
struct EchoOff {
    fd: i32,
    saved: libc::termios,
}

impl EchoOff {
    fn new(fd: i32) -> std::io::Result<EchoOff> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails without touching memory else.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: `quiet` is a valid termios copied from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EchoOff { fd, saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new` on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
