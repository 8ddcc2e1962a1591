//! `deliverous install`: puts the running binary and the systemd units (embedded in the binary)
//! in place, declares the `deliverous` group, and enables the service when systemd runs the
//! host. `--root` stages the same files under a directory (packaging), `--dry-run` only says
//! what would change, `--uninstall` removes what install put in place. Running it twice changes
//! nothing the second time.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

const BINARY: &str = "usr/local/bin/deliverous";
const UNIT_DIR: &str = "etc/systemd/system";
const SYSUSERS: &str = "etc/sysusers.d/deliverous.conf";
const GROUP: &str = "deliverous";

/// The units, as shipped in `systemd/`.
const UNITS: [(&str, &str); 4] = [
    ("deliverous.service", include_str!("../systemd/deliverous.service")),
    ("deliverous.socket", include_str!("../systemd/deliverous.socket")),
    ("deliverous-http.socket", include_str!("../systemd/deliverous-http.socket")),
    ("deliverous-https.socket", include_str!("../systemd/deliverous-https.socket")),
];
const SYSUSERS_CONF: &str = include_str!("../systemd/deliverous.sysusers");

/// The units `install` enables and starts. The HTTPS port's socket is left to the operator: it
/// needs certificates (`--certs-dir`) first.
const ENABLED: [&str; 3] = ["deliverous.socket", "deliverous-http.socket", "deliverous.service"];

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Install under this directory instead of `/` (for packages and images): nothing is
    /// enabled or started, and no group is created (the sysusers.d file declares it).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Print what would change, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stop and disable the service, and remove the binary, the units and the sysusers.d file.
    /// Running instances, data (/var/lib/deliverous) and the group are left alone.
    #[arg(long)]
    uninstall: bool,
}

pub fn main(args: InstallArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One file install owns: where, what, and with which mode.
struct Owned {
    path: PathBuf,
    content: Vec<u8>,
    mode: u32,
}

fn run(args: &InstallArgs) -> anyhow::Result<()> {
    if !args.root.is_absolute() {
        bail!("--root {:?} must be an absolute path", args.root);
    }
    let live = args.root == Path::new("/");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if live && !args.dry_run && unsafe { libc::geteuid() } != 0 {
        bail!("installing into / needs root: run it with sudo (or use --root DIR to stage the files)");
    }
    let systemd = live && systemd_running();
    let files = owned_files(&args.root)?;
    let say = |what: &str| {
        let prefix = if args.dry_run { "would " } else { "" };
        println!("{prefix}{what}");
    };
    if args.uninstall {
        if systemd {
            say(&format!("run: systemctl disable --now {}", ENABLED.join(" ")));
            if !args.dry_run {
                systemctl(&[&["disable", "--now"][..], &ENABLED[..]].concat())?;
            }
        }
        let mut removed = false;
        for file in &files {
            if file.path.symlink_metadata().is_ok() {
                say(&format!("remove {}", file.path.display()));
                if !args.dry_run {
                    std::fs::remove_file(&file.path)
                        .with_context(|| format!("cannot remove {}", file.path.display()))?;
                }
                removed = true;
            }
        }
        if systemd && removed {
            say("run: systemctl daemon-reload");
            if !args.dry_run {
                systemctl(&["daemon-reload"])?;
            }
        }
        if !removed {
            println!("nothing to remove under {}", args.root.display());
        }
        println!(
            "left alone: running instances (their shims outlive the daemon: stop apps first with `deliverous app \
             stop`), /var/lib/deliverous, /run/deliverous and the {GROUP} group"
        );
        return Ok(());
    }

    let mut binary_changed = false;
    let mut changed = false;
    for file in &files {
        match needs_write(file)? {
            None => println!("unchanged {}", file.path.display()),
            Some(reason) => {
                say(&format!("{reason} {}", file.path.display()));
                if !args.dry_run {
                    write_atomically(file)?;
                }
                changed = true;
                binary_changed |= file.path.ends_with(BINARY);
            }
        }
    }
    if live {
        ensure_group(args.dry_run)?;
    }
    let enable = format!("systemctl enable --now {}", ENABLED.join(" "));
    if !live {
        println!(
            "staged under {}; on the target host: systemd-sysusers && systemctl daemon-reload && {enable}",
            args.root.display()
        );
    } else if !systemd {
        println!(
            "systemd is not running on this host (PID 1 is not systemd): nothing was enabled. Start the daemon \
             yourself (`deliverous daemon`), or on a systemd host run: systemctl daemon-reload && {enable}"
        );
    } else {
        if changed {
            say("run: systemctl daemon-reload");
        }
        say(&format!("run: {enable}"));
        if binary_changed {
            say("run: systemctl try-restart deliverous.service (instances keep running)");
        }
        if !args.dry_run {
            if changed {
                systemctl(&["daemon-reload"])?;
            }
            systemctl(&[&["enable", "--now"][..], &ENABLED[..]].concat())?;
            if binary_changed {
                systemctl(&["try-restart", "deliverous.service"])?;
            }
        }
        println!("logs: journalctl -u deliverous -f");
    }
    Ok(())
}

fn owned_files(root: &Path) -> anyhow::Result<Vec<Owned>> {
    let exe = std::env::current_exe().context("cannot find the running binary")?;
    let binary = std::fs::read(&exe).with_context(|| format!("cannot read the running binary {}", exe.display()))?;
    let mut files = vec![Owned { path: root.join(BINARY), content: binary, mode: 0o755 }];
    for (name, text) in UNITS {
        files.push(Owned { path: root.join(UNIT_DIR).join(name), content: text.as_bytes().to_vec(), mode: 0o644 });
    }
    files.push(Owned { path: root.join(SYSUSERS), content: SYSUSERS_CONF.as_bytes().to_vec(), mode: 0o644 });
    Ok(files)
}

/// Why `file` must be written (`install`, `update`, `fix mode of`), or `None` if it is in place.
fn needs_write(file: &Owned) -> anyhow::Result<Option<&'static str>> {
    let meta = match std::fs::symlink_metadata(&file.path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some("install")),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", file.path.display())),
    };
    if !meta.is_file() || meta.len() != file.content.len() as u64 {
        return Ok(Some("update"));
    }
    let current = std::fs::read(&file.path).with_context(|| format!("cannot read {}", file.path.display()))?;
    if current != file.content {
        return Ok(Some("update"));
    }
    if meta.permissions().mode() & 0o7777 != file.mode {
        return Ok(Some("fix mode of"));
    }
    Ok(None)
}

/// Writes a sibling temp file and renames it over the target: a running binary is replaced,
/// not overwritten in place (which fails with ETXTBSY), and a crash leaves the old file whole.
fn write_atomically(file: &Owned) -> anyhow::Result<()> {
    let dir = file.path.parent().context("a file to install has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile_in(dir, &file.path)?;
    let result = (|| -> std::io::Result<()> {
        tmp.1.write_all(&file.content)?;
        tmp.1.set_permissions(std::fs::Permissions::from_mode(file.mode))?;
        tmp.1.sync_all()?;
        std::fs::rename(&tmp.0, &file.path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp.0);
        return Err(e).with_context(|| format!("cannot write {}", file.path.display()));
    }
    Ok(())
}

fn tempfile_in(dir: &Path, target: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for attempt in 0..100u32 {
        let path = dir.join(format!(".{name}.dlv-install-{}-{attempt}", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create a temporary file in {}", dir.display())),
        }
    }
    bail!("cannot create a temporary file in {}: all names taken", dir.display())
}

/// `sd_booted()`: systemd creates this directory when it is PID 1.
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn group_exists(name: &str) -> anyhow::Result<bool> {
    Ok(nix::unistd::Group::from_name(name).with_context(|| format!("cannot look up group {name}"))?.is_some())
}

fn ensure_group(dry_run: bool) -> anyhow::Result<()> {
    if group_exists(GROUP)? {
        println!("unchanged group {GROUP}");
        return Ok(());
    }
    if dry_run {
        println!("would create system group {GROUP}");
        return Ok(());
    }
    run_tool("groupadd", &["--system", GROUP])?;
    println!("created system group {GROUP} (add API users with: usermod -aG {GROUP} USER)");
    Ok(())
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    run_tool("systemctl", args)
}

fn run_tool(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(tool).args(args).status().with_context(|| format!("cannot run {tool}"))?;
    if !status.success() {
        bail!("`{tool} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_units_are_the_shipped_ones() {
        for (name, text) in UNITS {
            let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(name))
                .unwrap_or_else(|e| panic!("systemd/{name}: {e}"));
            assert_eq!(text, shipped, "{name}");
        }
        let service = UNITS[0].1;
        for line in [
            "Type=notify",
            "KillMode=process",
            "Delegate=yes",
            "ExecStart=/usr/local/bin/deliverous daemon $DELIVEROUS_ARGS",
        ] {
            assert!(service.lines().any(|l| l == line), "deliverous.service lacks {line}");
        }
        let socket = UNITS[1].1;
        for line in [
            "ListenStream=/run/deliverous/api.sock",
            "SocketMode=0660",
            "SocketGroup=deliverous",
            "FileDescriptorName=api",
        ] {
            assert!(socket.lines().any(|l| l == line), "deliverous.socket lacks {line}");
        }
    }

    #[test]
    fn a_file_in_place_needs_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = Owned { path: dir.path().join("a/b/unit"), content: b"x=1\n".to_vec(), mode: 0o644 };
        assert_eq!(needs_write(&file).unwrap(), Some("install"));
        write_atomically(&file).unwrap();
        assert_eq!(needs_write(&file).unwrap(), None);
        std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(needs_write(&file).unwrap(), Some("fix mode of"));
        std::fs::write(&file.path, b"x=2\n").unwrap();
        assert_eq!(needs_write(&file).unwrap(), Some("update"));
        // No temporary file is left next to it.
        assert_eq!(std::fs::read_dir(dir.path().join("a/b")).unwrap().count(), 1);
    }
}
