//! `--userns`: an app's instances run in a user namespace of their own. Root inside is an
//! unprivileged id range on the host, kept for the app's name; the instance still gets its
//! network (configured from outside between build and start) and serves through the proxy.
//! Runs on this host (cgroup v1) and in the cgroup v2 VM (tests/vm/run).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{http_get, http_get_retry, Daemon, Registry};

/// Host ids for this test's daemon: two apps' worth.
const FIRST: u32 = 1_500_000_000;
const RANGE: &str = "1500000000:131072";

/// The harness's temporary directory is 0700: an instance's root (an unprivileged host id)
/// could not reach its root filesystem below it. The daemon opens its own data dir (o+x), not
/// what is above it.
fn open_test_dir(daemon: &Daemon) {
    use std::os::unix::fs::PermissionsExt;
    let data = daemon.data_dir();
    let top = data.parent().expect("data dir has a parent");
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o711)).expect("chmod test dir");
}

/// Idmapped overlay layers need Linux 5.19 and, for the layers' file system, ext4, xfs or
/// btrfs (tmpfs only from 6.3).
fn idmapped_layers_expected(daemon: &Daemon) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let fs = nix::sys::statfs::statfs(&daemon.data_dir()).map(|s| s.filesystem_type());
    let disk = fs.is_ok_and(|t| {
        [nix::sys::statfs::EXT4_SUPER_MAGIC, nix::sys::statfs::XFS_SUPER_MAGIC, nix::sys::statfs::BTRFS_SUPER_MAGIC]
            .contains(&t)
    });
    version >= (5, 19) && disk
}

fn instance(daemon: &Daemon, app: &str) -> (String, u64) {
    let show = daemon.cli_json(&["app", "show", app, "--json"]);
    let instance = &show["instances"][0];
    let id = instance["id"].as_str().unwrap_or_else(|| panic!("no instance of {app}: {show}")).to_string();
    let pid = instance["pid"].as_u64().unwrap_or_else(|| panic!("no pid for {app}: {show}"));
    (id, pid)
}

fn sh(daemon: &Daemon, app: &str, script: &str) -> String {
    daemon.cli_ok(&["exec", app, "--", "sh", "-c", script])
}

/// `Uid:` / `Gid:` of a host process: real, effective, saved, filesystem.
fn host_ids(pid: u64, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("instance status");
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {status}"));
    line.split_whitespace().skip(1).map(|n| n.parse().expect("id")).collect()
}

fn probe(daemon: &Daemon, app: &str) -> BTreeMap<String, String> {
    let (status, body) = http_get(daemon.proxy_addr(), &format!("{app}.localhost"), "/probe");
    assert_eq!(status, 200, "{body}");
    body.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn a_userns_app_runs_as_an_unprivileged_range_and_serves() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start_with_args(&registry, &["--userns-range", RANGE]);
    let img = image.reference.as_str();
    open_test_dir(&daemon);
    daemon.cli_ok(&["app", "create", "box", "--image", img, "--port", "8080", "--userns", "-v", "data:/data"]);
    daemon.cli_ok(&["app", "create", "plain", "--image", img, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "box"]);
    daemon.cli_ok(&["app", "start", "plain"]);
    let show = daemon.cli_json(&["app", "show", "box", "--json"]);
    assert_eq!(show["userns"], true, "{show}");

    // It serves through the proxy: its network was plugged from outside.
    let (status, body) =
        http_get_retry(daemon.proxy_addr(), "box.localhost", "/hostname", Duration::from_secs(10), |s, _| s == 200);
    assert_eq!((status, body.trim()), (200, "box.1"));

    // Inside: root, in a mapped user namespace.
    assert_eq!(sh(&daemon, "box", "id -u; id -g"), "0\n0\n");
    let map = sh(&daemon, "box", "cat /proc/self/uid_map /proc/self/gid_map");
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    let expected = vec!["0".to_string(), FIRST.to_string(), "65536".to_string()];
    for row in &rows {
        assert_eq!(row.iter().map(|s| s.to_string()).collect::<Vec<_>>(), expected, "{map}");
    }
    assert_eq!(rows.len(), 2, "{map}");
    // Without --userns nothing changes: the host's whole range.
    let plain = sh(&daemon, "plain", "cat /proc/self/uid_map");
    assert_eq!(plain.split_whitespace().collect::<Vec<_>>(), ["0", "0", "4294967295"], "{plain}");

    // On the host, the instance's processes run as the range's first id, not as root.
    let (id, pid) = instance(&daemon, "box");
    assert_eq!(host_ids(pid, "Uid:"), vec![FIRST; 4]);
    assert_eq!(host_ids(pid, "Gid:"), vec![FIRST; 4]);

    // What it writes in its root filesystem is owned by that id on the host (the upper dir).
    sh(&daemon, "box", "echo hi > /made-inside && mkdir /tmp/dir-inside");
    let upper = daemon.data_dir().join("instances").join(&id).join("upper");
    let made = std::fs::metadata(upper.join("made-inside")).expect("the file is in the upper dir");
    assert_eq!((made.uid(), made.gid()), (FIRST, FIRST));
    let dir = std::fs::metadata(upper.join("tmp/dir-inside")).expect("the directory is in the upper dir");
    assert_eq!((dir.uid(), dir.gid()), (FIRST, FIRST));
    // A new named volume belongs to it too, and it can write there.
    let volume = daemon.data_dir().join("volumes/data");
    let meta = std::fs::metadata(&volume).expect("volume created");
    assert_eq!((meta.uid(), meta.gid()), (FIRST, FIRST));
    sh(&daemon, "box", "echo kept > /data/note");
    assert_eq!(std::fs::metadata(volume.join("note")).expect("note").uid(), FIRST);
    // /etc/hosts and friends are its own as well.
    sh(&daemon, "box", "echo '10.9.9.9 extra' >> /etc/hosts");

    // The image's files (host root's, in layers shared with other apps) are seen through
    // idmapped mounts where the kernel and file system allow: root's inside, and a change is a
    // copy owned by the range. Elsewhere they stay host root's: `nobody` inside, and not even
    // CAP_DAC_OVERRIDE lets root in the user namespace change them.
    let owners = sh(&daemon, "box", "stat -c %u:%g /etc/passwd /etc");
    eprintln!("image files inside a userns instance: {owners:?} (0:0 with idmapped layers)");
    if idmapped_layers_expected(&daemon) {
        assert_eq!(owners, "0:0\n0:0\n", "idmapped layers expected on this kernel and file system");
    }
    if owners == "0:0\n0:0\n" {
        sh(&daemon, "box", "echo '# changed' >> /etc/passwd && touch /etc/new-file");
        for file in ["etc/passwd", "etc/new-file"] {
            let meta = std::fs::metadata(upper.join(file)).expect("copied up");
            assert_eq!((meta.uid(), meta.gid()), (FIRST, FIRST), "{file}");
        }
        let (status, body) = http_get(daemon.proxy_addr(), "plain.localhost", "/");
        assert_eq!(status, 200, "{body}");
        let theirs = sh(&daemon, "plain", "cat /etc/passwd; ls /etc");
        assert!(!theirs.contains("changed") && !theirs.contains("new-file"), "the shared layer changed: {theirs}");
    } else {
        assert_eq!(owners, "65534:65534\n65534:65534\n");
        for write in ["echo x >> /etc/passwd", "touch /etc/new-file"] {
            let out = daemon.cli(&["exec", "box", "--", "sh", "-c", write]);
            assert!(!out.success(), "{write:?} on host root's files worked: {out:?}");
            assert!(out.stderr.to_lowercase().contains("permission denied"), "{out:?}");
            let out = daemon.cli(&["exec", "plain", "--", "sh", "-c", write]);
            assert!(out.success(), "{write:?} works without a user namespace: {out:?}");
        }
    }
    // Device nodes need host privileges: CAP_MKNOD inside a user namespace does not make one.
    let boxed = probe(&daemon, "box");
    assert_eq!(boxed.get("mknod_null").map(String::as_str), Some("EPERM"), "{boxed:#?}");
    assert_eq!(boxed.get("CapEff").map(String::as_str), Some("00000000a80425fb"), "{boxed:#?}");
    assert_eq!(boxed.get("NoNewPrivs").map(String::as_str), Some("1"), "{boxed:#?}");
    assert_eq!(boxed.get("Seccomp").map(String::as_str), Some("2"), "{boxed:#?}");
    let plain = probe(&daemon, "plain");
    assert_eq!(plain.get("mknod_null").map(String::as_str), Some("ok"), "{plain:#?}");
}

#[test]
fn userns_is_a_config_change_and_the_range_stays_the_apps() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let mut daemon = Daemon::start_with_args(&registry, &["--userns-range", RANGE]);
    let img = image.reference.as_str();
    open_test_dir(&daemon);
    daemon.cli_ok(&["app", "create", "first", "--image", img, "--port", "8080", "--userns"]);
    daemon.cli_ok(&["app", "create", "second", "--image", img, "--port", "8080", "--userns"]);
    daemon.cli_ok(&["app", "create", "third", "--image", img, "--port", "8080", "--userns"]);
    daemon.cli_ok(&["app", "start", "first"]);
    daemon.cli_ok(&["app", "start", "second"]);
    let host_uid = |daemon: &Daemon, app: &str| host_ids(instance(daemon, app).1, "Uid:")[0];
    assert_eq!(host_uid(&daemon, "first"), FIRST);
    assert_eq!(host_uid(&daemon, "second"), FIRST + 65536);
    // The range is full: a third app cannot start, and says why.
    let out = daemon.cli(&["app", "start", "third"]);
    let show = daemon.cli_json(&["app", "show", "third", "--json"]);
    assert!(
        !out.success() || show["instances"].as_array().is_none_or(|i| i.is_empty()),
        "a third range was found in a two-app range: {out:?} {show}"
    );
    assert!(
        out.stderr.contains("--userns-range") || daemon.log_tail(200).contains("--userns-range"),
        "{out:?}\n{}",
        daemon.log_tail(50)
    );
    daemon.cli_ok(&["app", "rm", "third"]);

    // Turning it off is a new revision: root is host root again.
    let before = daemon.cli_json(&["app", "show", "first", "--json"])["revision"]["number"].as_u64();
    daemon.cli_ok(&["app", "config", "first", "--userns=false"]);
    let show = daemon.cli_json(&["app", "show", "first", "--json"]);
    assert_eq!(show["userns"], false, "{show}");
    assert_ne!(show["revision"]["number"].as_u64(), before, "a new revision");
    let (_, pid) = instance(&daemon, "first");
    assert_eq!(host_ids(pid, "Uid:")[0], 0);

    // Across a daemon restart and back on: the same range as before.
    daemon.restart();
    daemon.cli_ok(&["app", "config", "first", "--userns"]);
    assert_eq!(host_uid(&daemon, "first"), FIRST);
    assert_eq!(host_uid(&daemon, "second"), FIRST + 65536, "re-attached, still mapped");
    let (status, _) =
        http_get_retry(daemon.proxy_addr(), "first.localhost", "/", Duration::from_secs(10), |s, _| s == 200);
    assert_eq!(status, 200);
    // One-off instances of a userns app are in its range too.
    let out = daemon.cli_ok(&["run", "first", "--", "sh", "-c", "id -u; cat /proc/self/uid_map"]);
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words, ["0", "0", &FIRST.to_string(), "65536"], "{out}");
}
