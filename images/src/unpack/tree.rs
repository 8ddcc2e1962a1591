//! The layer root while a layer is extracted into it, reached only through directory
//! descriptors: an entry is created, changed or removed relative to its parent directory's
//! descriptor without following its last component, and parent directories are opened with the
//! kernel refusing symlinks anywhere on the way. What an earlier entry planted (a symlink where
//! a directory was) can never redirect a later one, whatever the order of the stream.

use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmodat, fstat, fstatat, mkdirat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{getegid, geteuid, unlinkat, UnlinkatFlags};

/// Set once `openat2(2)` turned out to be unavailable (kernels before 5.6, seccomp filters that
/// hide it, a kernel that does not know a flag): directories are then opened one `O_NOFOLLOW`
/// component at a time, which is as strict, only slower.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread has a umask of its own, cleared (see [`clear_umask`]).
    static UMASK_CLEARED: Cell<bool> = const { Cell::new(false) };
}

/// Gives the calling thread a file system context of its own (unshare(2) `CLONE_FS`) with a
/// cleared umask, so that it makes files with exactly the mode asked for, and needs no chmod
/// after. Only for a thread that ends with its layer: the process's umask is untouched.
pub(super) fn clear_umask() {
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).is_ok() {
        nix::sys::stat::umask(Mode::empty());
        UMASK_CLEARED.with(|cleared| cleared.set(true));
    }
}

/// Flags of a directory descriptor only used to reach what is inside it.
const DIR_PATH: OFlag = OFlag::O_PATH.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

/// `openat(2)` returning an owned descriptor.
pub(super) fn open_at(dir: RawFd, name: &OsStr, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let fd = openat(Some(dir), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `name` in `dir` is a directory itself (not a symlink to one).
fn is_dir_at(dir: RawFd, name: &OsStr) -> bool {
    fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|s| s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits())
}

fn is_symlink_at(dir: RawFd, name: &OsStr) -> bool {
    fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|s| s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits())
}

/// `components` as a relative path, for messages.
pub(super) fn display(components: &[OsString]) -> String {
    components.iter().collect::<PathBuf>().display().to_string()
}

/// Why a directory beneath the root cannot be reached.
pub(super) enum Unreachable {
    /// A component does not exist.
    Missing,
    /// `components[..=at]` exists and is a symlink, or something else that is not a directory.
    NotDir { at: usize, symlink: bool },
    /// Opening (or creating) `components[..=at]` failed.
    Failed { at: usize, errno: Errno },
}

/// The owner (uid, gid) of what `creator` (our effective ids) creates in a directory of group
/// `dir_gid`, when it does not depend on whether the directory passes its group on (setgid, or
/// a file system mounted `grpid`): when that group is ours too.
pub(super) fn new_owner(creator: (u32, u32), dir_gid: u32) -> Option<(u32, u32)> {
    (dir_gid == creator.1).then_some(creator)
}

/// A directory beneath the root, open to make entries in it.
pub(super) struct Dir {
    pub(super) fd: OwnedFd,
    /// The owner its new entries get, if known for sure (see [`new_owner`]): a layer's entries
    /// mostly want it, and then need no chown.
    pub(super) new_owner: Cell<Option<(u32, u32)>>,
}

impl Dir {
    fn new(fd: OwnedFd, creator: (u32, u32)) -> Dir {
        let gid = fstat(fd.as_raw_fd()).ok().map(|s| s.st_gid);
        Dir { fd, new_owner: Cell::new(gid.and_then(|gid| new_owner(creator, gid))) }
    }
}

pub(super) struct Tree {
    /// The layer root, open for reading (its own metadata is set through it).
    root: Rc<Dir>,
    path: PathBuf,
    /// Our effective uid and gid: the owner of what we create.
    creator: (u32, u32),
    /// The directory the previous entry went into. Tar writers list a directory's entries
    /// together, so most entries find their parent here without any lookup.
    last_dir: Option<(Vec<OsString>, Rc<Dir>)>,
    /// Try `openat2(2)` (unless it already turned out to be unavailable).
    openat2: bool,
    /// This thread's umask is cleared: what it makes gets the mode it asks for.
    exact_modes: bool,
}

impl Tree {
    pub(super) fn open(root: &Path) -> Result<Tree, String> {
        let fd = openat(
            None,
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening the layer root {}: {e}", root.display()))?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        let root_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let creator = (geteuid().as_raw(), getegid().as_raw());
        Ok(Tree {
            root: Rc::new(Dir::new(root_fd, creator)),
            path: root.to_path_buf(),
            creator,
            last_dir: None,
            openat2: true,
            exact_modes: UMASK_CLEARED.with(Cell::get),
        })
    }

    /// Whether a file made with a mode has exactly that mode (see [`clear_umask`]).
    pub(super) fn exact_modes(&self) -> bool {
        self.exact_modes
    }

    /// Behaves as on a kernel without `openat2(2)`.
    #[cfg(test)]
    pub(super) fn without_openat2(self) -> Tree {
        Tree { openat2: false, ..self }
    }

    pub(super) fn root(&self) -> RawFd {
        self.root.fd.as_raw_fd()
    }

    /// After the root's own entry changed its owner.
    pub(super) fn root_changed(&self) {
        let gid = fstat(self.root()).ok().map(|s| s.st_gid);
        self.root.new_owner.set(gid.and_then(|gid| new_owner(self.creator, gid)));
    }

    /// The path of `components` beneath the root, for the few calls that only take a path
    /// (`lsetxattr`, a recursive removal). Its directories must have just been opened without
    /// following anything: nothing else writes beneath the root, so the path names them.
    pub(super) fn path_of(&self, components: &[OsString]) -> PathBuf {
        let mut p = self.path.clone();
        p.extend(components);
        p
    }

    /// The directory `parents` for a new entry, created as needed (implicit parents get
    /// Docker's default mode; a later entry may change it). Refuses any component that exists
    /// as something other than a real directory: a symlink there could point anywhere.
    pub(super) fn dir(&mut self, parents: &[OsString]) -> Result<Rc<Dir>, String> {
        if parents.is_empty() {
            return Ok(self.root.clone());
        }
        if let Some((components, dir)) = &self.last_dir {
            if components == parents {
                return Ok(dir.clone());
            }
        }
        // One lookup when the directories are there; missing ones, or one that is not a
        // directory, take the walk, which makes them or says which it is.
        let fd = match self.open_beneath(parents, DIR_PATH) {
            Ok(fd) => fd,
            Err(_) => self.walk(parents, true).map_err(|e| match e {
                Unreachable::NotDir { at, symlink } => format!(
                    "parent {:?} is {}; refusing to write through it",
                    display(&parents[..=at]),
                    if symlink { "a symlink" } else { "not a directory" }
                ),
                Unreachable::Failed { at, errno } => {
                    format!("opening or creating parent {:?}: {errno}", display(&parents[..=at]))
                }
                Unreachable::Missing => format!("parent {:?} vanished", display(parents)),
            })?,
        };
        let dir = Rc::new(Dir::new(fd, self.creator));
        self.last_dir = Some((parents.to_vec(), dir.clone()));
        Ok(dir)
    }

    /// The existing directory `components` (not empty), reached through real directories only;
    /// nothing is created.
    pub(super) fn existing_dir(&self, components: &[OsString]) -> Result<OwnedFd, Unreachable> {
        match self.open_beneath(components, DIR_PATH) {
            Ok(fd) => Ok(fd),
            Err(_) => self.walk(components, false),
        }
    }

    /// Opens `components` (not empty) beneath the root with `flags`, the kernel refusing
    /// symlinks on the way and at the end.
    pub(super) fn open_beneath(&self, components: &[OsString], flags: OFlag) -> nix::Result<OwnedFd> {
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if self.openat2 && !NO_OPENAT2.load(Ordering::Relaxed) {
            let how =
                OpenHow::new().flags(flags).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
            let path: PathBuf = components.iter().collect();
            match openat2(self.root(), &path, how) {
                Err(Errno::ENOSYS | Errno::EPERM | Errno::EINVAL | Errno::E2BIG) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed)
                }
                opened => {
                    return opened.map(|fd| {
                        // SAFETY: openat2 just returned this descriptor; nothing else owns it.
                        unsafe { OwnedFd::from_raw_fd(fd) }
                    });
                }
            }
        }
        let Some((last, parents)) = components.split_last() else {
            return Err(Errno::ENOENT);
        };
        if parents.is_empty() {
            return open_at(self.root(), last, flags, Mode::empty());
        }
        let dir = self.walk(parents, false).map_err(|e| match e {
            Unreachable::Missing => Errno::ENOENT,
            Unreachable::NotDir { .. } => Errno::ENOTDIR,
            Unreachable::Failed { errno, .. } => errno,
        })?;
        open_at(dir.as_raw_fd(), last, flags, Mode::empty())
    }

    /// Opens `components` (not empty) one at a time, each with `O_NOFOLLOW`; with `create`,
    /// missing directories are made with mode 0755.
    fn walk(&self, components: &[OsString], create: bool) -> Result<OwnedFd, Unreachable> {
        let mut dir: Option<OwnedFd> = None;
        for (at, c) in components.iter().enumerate() {
            let parent = dir.as_ref().map_or(self.root(), AsRawFd::as_raw_fd);
            let open = || open_at(parent, c, DIR_PATH, Mode::empty());
            let opened = match open() {
                Err(Errno::ENOENT) if create => {
                    let mode = Mode::from_bits_truncate(0o755);
                    mkdirat(Some(parent), c.as_os_str(), mode)
                        .and_then(|()| fchmodat(Some(parent), c.as_os_str(), mode, FchmodatFlags::FollowSymlink))
                        .and_then(|()| open())
                }
                other => other,
            };
            dir = Some(match opened {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Err(Unreachable::Missing),
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    return Err(Unreachable::NotDir { at, symlink: is_symlink_at(parent, c) });
                }
                Err(errno) => return Err(Unreachable::Failed { at, errno }),
            });
        }
        dir.ok_or(Unreachable::Missing)
    }

    /// Creates `name` in `dir` (the directory `parents`) with `make`. If the name is taken,
    /// removes what is there, never following it, and makes it again: the last entry for a path
    /// wins, as with `tar -x`. Nothing is looked up first: in a layer, names are almost always
    /// new. `what` prefixes `make`'s error.
    pub(super) fn replace<T>(
        &mut self,
        dir: &OwnedFd,
        parents: &[OsString],
        name: &OsStr,
        what: &str,
        make: impl Fn() -> nix::Result<T>,
    ) -> Result<T, String> {
        match make() {
            Err(Errno::EEXIST) => {
                self.remove(dir, parents, name)?;
                make()
            }
            other => other,
        }
        .map_err(|e| format!("{what}: {e}"))
    }

    /// Makes directory `name` in `dir` (the directory `parents`), or keeps the directory already
    /// there; anything else there is replaced. Returns whether it made it.
    pub(super) fn make_dir(&mut self, dir: &OwnedFd, parents: &[OsString], name: &OsStr) -> Result<bool, String> {
        // Its entry may change its owner, on which the owner of its new entries depends.
        let is_it = |c: &[OsString]| c.len() == parents.len() + 1 && c.starts_with(parents) && c[parents.len()] == name;
        if self.last_dir.as_ref().is_some_and(|(c, _)| is_it(c)) {
            self.last_dir = None;
        }
        let make = || mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o700));
        match make() {
            Err(Errno::EEXIST) if is_dir_at(dir.as_raw_fd(), name) => return Ok(false),
            Err(Errno::EEXIST) => {
                self.remove(dir, parents, name)?;
                make()
            }
            other => other,
        }
        .map(|()| true)
        .map_err(|e| format!("creating directory: {e}"))
    }

    /// Removes `name` from `dir` (the directory `parents`) without following it: a directory
    /// with everything beneath it, anything else by unlinking it.
    pub(super) fn remove(&mut self, dir: &OwnedFd, parents: &[OsString], name: &OsStr) -> Result<(), String> {
        if !is_dir_at(dir.as_raw_fd(), name) {
            return unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| format!("replacing {:?}: {e}", display(&[parents, &[name.to_os_string()]].concat())));
        }
        let mut components = parents.to_vec();
        components.push(name.to_os_string());
        // Rare (an entry replacing a directory), so by path: std's remove_dir_all follows no
        // symlink beneath it.
        let path = self.path_of(&components);
        fs::remove_dir_all(&path).map_err(|e| format!("replacing directory {}: {e}", path.display()))?;
        // Later entries beneath it go into whatever replaces it, not into the removed directory.
        if self.last_dir.as_ref().is_some_and(|(c, _)| c.starts_with(&components)) {
            self.last_dir = None;
        }
        Ok(())
    }
}
