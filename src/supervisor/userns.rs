//! `--userns` apps: the host id range each app's instances map their ids to. Ranges are
//! 65536 ids long (a whole 16-bit id space, as images expect), taken from the daemon's
//! `--userns-range` and kept per app name in the store (see `apps::store::userns`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use deliverous_runtime::spec::IdMap;

use super::{Supervisor, SupervisorError};

/// Ids per app: container ids 0..65535.
pub const IDS_PER_APP: u32 = 65536;

/// The default `--userns-range`: 1000 apps' worth of ids above the ranges `useradd` hands out
/// in /etc/subuid for the first users (100000 onwards, 65536 each).
pub const DEFAULT_RANGE: &str = "1000000:65536000";

/// `FIRST:COUNT` host ids apps' ranges are taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsernsRange {
    pub first: u32,
    pub count: u32,
}

impl std::str::FromStr for UsernsRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid user namespace range {text:?}: {why}");
        let (first, count) = text.split_once(':').ok_or_else(|| bad("expected FIRST:COUNT, e.g. 1000000:65536000"))?;
        let first: u32 = first.trim().parse().map_err(|_| bad("FIRST is not a host id"))?;
        let count: u32 = count.trim().parse().map_err(|_| bad("COUNT is not a number of ids"))?;
        if first < IDS_PER_APP {
            return Err(bad("FIRST must be at least 65536: lower host ids belong to the host's own users"));
        }
        if count < IDS_PER_APP {
            return Err(bad("COUNT must be at least 65536 (one app's ids)"));
        }
        if u64::from(first) + u64::from(count) > u64::from(u32::MAX) {
            return Err(bad("the range ends past the last host id (4294967294)"));
        }
        Ok(UsernsRange { first, count })
    }
}

impl Supervisor {
    /// The id map of app `app`'s instances: its recorded range, or a new one.
    pub(super) fn userns_map(&self, app: &str) -> Result<IdMap, SupervisorError> {
        let range = self.settings.userns_range;
        let (host_first, size) = self.store.userns_range(app, range.first, range.count, IDS_PER_APP)?;
        Ok(IdMap { host_first, size })
    }
}

/// Makes sure an instance's root (an unprivileged host id) can reach `path`: the init process
/// mounts the root filesystem, `/etc/hosts` and the volumes from inside its user namespace, with
/// the host's permission checks. Directories under `owned` (the daemon's data dir) get the
/// search bit for others (`o+x`: a path can be followed, nothing listed), as Docker's
/// userns-remap does to its data root; an ancestor outside it that is not searchable is an
/// error saying what to change.
pub fn make_reachable(path: &Path, owned: &Path, map: &IdMap) -> Result<(), String> {
    let mut walked = std::path::PathBuf::new();
    for component in path.components() {
        walked.push(component);
        if walked == path {
            break;
        }
        let meta = std::fs::metadata(&walked).map_err(|e| format!("{}: {e}", walked.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 != 0 {
            continue;
        }
        if walked.starts_with(owned) {
            std::fs::set_permissions(&walked, std::fs::Permissions::from_mode((mode | 0o001) & 0o7777))
                .map_err(|e| format!("{}: {e}", walked.display()))?;
        } else {
            return Err(format!(
                "{} (mode {:04o}) cannot be searched by the instance's root (host uid {}), so a \
                 --userns instance cannot reach {}: give it the search bit (chmod o+x {})",
                walked.display(),
                mode & 0o7777,
                map.host_first,
                path.display(),
                walked.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_are_checked() {
        assert_eq!(DEFAULT_RANGE.parse::<UsernsRange>(), Ok(UsernsRange { first: 1_000_000, count: 65_536_000 }));
        for bad in ["", "100000", "x:65536", "0:65536", "100000:100", "4294000000:65536000"] {
            let err = bad.parse::<UsernsRange>().unwrap_err();
            assert!(err.contains("invalid user namespace range"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_data_dir_is_made_searchable_and_other_dirs_are_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let data = closed.join("data");
        let instance = data.join("instances/abc");
        std::fs::create_dir_all(&instance).unwrap();
        for d in [&closed, &data, &data.join("instances")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let map = IdMap { host_first: 1_000_000, size: 65536 };
        let err = make_reachable(&instance.join("rootfs"), &data, &map).unwrap_err();
        assert!(err.contains("chmod o+x") && err.contains("closed"), "{err}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        make_reachable(&instance.join("rootfs"), &data, &map).unwrap();
        for d in [&data, &data.join("instances"), &instance] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o001, 0o001, "{}: {mode:o}", d.display());
        }
        assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o701);
    }
}
