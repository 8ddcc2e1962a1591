//! Seccomp profiles compiled once. libcontainer compiles the OCI profile (`linux.seccomp`) with
//! libseccomp inside every container's init: about 7 ms of CPU, the largest part of a start. We
//! compile each distinct profile once, keep the BPF program in a cache directory keyed by a
//! hash of the profile, and load the program into the init before it runs anything of the
//! image ([`FilteredExecutor`]).
//!
//! Semantics are those libcontainer 0.7 gives the same profile: the same libseccomp calls in the
//! same order (default action, architectures, no NNP attribute, one rule per name, unknown names
//! skipped, comparisons on a repeated argument index added as separate rules), the program
//! exported instead of loaded, and loaded with the same `seccomp(SECCOMP_SET_MODE_FILTER, 0)`.
//! Profiles using what a precompiled program cannot carry (filter flags, notifications, a
//! listener) are left to libcontainer; see [`precompilable`].

use std::collections::HashSet;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use libcontainer::workload::{Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError};
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, Spec};
use sha2::{Digest, Sha256};

/// Why a profile could not be compiled, cached or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("compiling the seccomp profile: {0}")]
    Compile(String),
    #[error("seccomp program cache {}: {source}", path.display())]
    Cache { path: PathBuf, source: std::io::Error },
    #[error("invalid seccomp program: {0}")]
    Invalid(String),
    #[error("cannot load the seccomp filter: {0}")]
    Install(std::io::Error),
}

/// The kernel's limit on a classic BPF program (BPF_MAXINSNS).
const MAX_INSTRUCTIONS: usize = 4096;
/// One `struct sock_filter`: u16 code, u8 jt, u8 jf, u32 k.
const INSTRUCTION_BYTES: usize = 8;
/// First bytes of a cache file; a new layout gets a new magic (and so a new key).
const MAGIC: &[u8; 8] = b"DLVBPF1\n";

/// A compiled seccomp filter: classic BPF instructions, ready for `seccomp(2)`.
#[derive(Clone)]
pub struct Program {
    instructions: Vec<libc::sock_filter>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Program({} instructions)", self.instructions.len())
    }
}

// `libc::sock_filter` has no PartialEq without libc's extra traits: compare the bytes.
impl PartialEq for Program {
    fn eq(&self, other: &Self) -> bool {
        self.to_bytes() == other.to_bytes()
    }
}

impl Program {
    /// A program from libseccomp's export (native-endian `struct sock_filter`s). Rejects what
    /// the kernel would: an empty program, a partial instruction, more than 4096 instructions.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BpfError> {
        if bytes.is_empty() || bytes.len() % INSTRUCTION_BYTES != 0 {
            return Err(BpfError::Invalid(format!(
                "{} bytes is not a whole number of {INSTRUCTION_BYTES}-byte instructions",
                bytes.len()
            )));
        }
        let count = bytes.len() / INSTRUCTION_BYTES;
        if count > MAX_INSTRUCTIONS {
            return Err(BpfError::Invalid(format!(
                "{count} instructions, the kernel takes at most {MAX_INSTRUCTIONS}"
            )));
        }
        let instructions = bytes
            .chunks_exact(INSTRUCTION_BYTES)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Program { instructions })
    }

    /// The program as libseccomp exports it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.instructions.len() * INSTRUCTION_BYTES);
        for i in &self.instructions {
            out.extend_from_slice(&i.code.to_ne_bytes());
            out.extend_from_slice(&[i.jt, i.jf]);
            out.extend_from_slice(&i.k.to_ne_bytes());
        }
        out
    }

    pub fn instructions(&self) -> usize {
        self.instructions.len()
    }

    /// Loads the filter on the calling thread, as libseccomp's `seccomp_load` does for a profile
    /// without flags. Needs no_new_privs (or CAP_SYS_ADMIN); irreversible.
    pub fn install(&self) -> Result<(), BpfError> {
        let len = u16::try_from(self.instructions.len())
            .map_err(|_| BpfError::Invalid(format!("{} instructions", self.instructions.len())))?;
        let prog = libc::sock_fprog { len, filter: self.instructions.as_ptr().cast_mut() };
        // SAFETY: `prog` points at `len` initialised instructions that outlive the call; the
        // kernel copies them and keeps no pointer.
        let rc = unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog)
        };
        if rc != 0 {
            return Err(BpfError::Install(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Whether libcontainer's semantics for `profile` survive precompilation: filter flags,
/// notification actions and a listener are acted on at load time, not carried in the program.
pub fn precompilable(profile: &LinuxSeccomp) -> Result<(), String> {
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        return Err("it sets filter flags".into());
    }
    if profile.listener_path().is_some() {
        return Err("it names a listener".into());
    }
    let notify = std::iter::once(profile.default_action())
        .chain(profile.syscalls().iter().flatten().map(|s| s.action()))
        .any(|a| a == LinuxSeccompAction::ScmpActNotify);
    if notify {
        return Err("it asks for user-space notifications".into());
    }
    Ok(())
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, BpfError> {
    let errno = match errno {
        Some(e) => i32::try_from(e).map_err(|_| BpfError::Compile(format!("errno {e} is out of range")))?,
        None => libc::EPERM,
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => ScmpAction::KillThread,
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(
            u16::try_from(errno).map_err(|_| BpfError::Compile(format!("trace value {errno} is out of range")))?,
        ),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(BpfError::Compile("notification actions cannot be precompiled".into()))
        }
    })
}

fn arch(arch: Arch) -> ScmpArch {
    match arch {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchMips => ScmpArch::Mips,
        Arch::ScmpArchMips64 => ScmpArch::Mips64,
        Arch::ScmpArchMips64n32 => ScmpArch::Mips64N32,
        Arch::ScmpArchMipsel => ScmpArch::Mipsel,
        Arch::ScmpArchMipsel64 => ScmpArch::Mipsel64,
        Arch::ScmpArchMipsel64n32 => ScmpArch::Mipsel64N32,
        Arch::ScmpArchPpc => ScmpArch::Ppc,
        Arch::ScmpArchPpc64 => ScmpArch::Ppc64,
        Arch::ScmpArchPpc64le => ScmpArch::Ppc64Le,
        Arch::ScmpArchS390 => ScmpArch::S390,
        Arch::ScmpArchS390x => ScmpArch::S390X,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
        Arch::ScmpArchParisc => ScmpArch::Parisc,
        Arch::ScmpArchParisc64 => ScmpArch::Parisc64,
        Arch::ScmpArchLoongarch64 => ScmpArch::Loongarch64,
        Arch::ScmpArchM68k => ScmpArch::M68k,
        Arch::ScmpArchSh => ScmpArch::Sh,
        Arch::ScmpArchSheb => ScmpArch::Sheb,
    }
}

fn op(op: LinuxSeccompOperator, mask: Option<u64>) -> ScmpCompareOp {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        // As libcontainer 0.7 reads it: `valueTwo` is the mask, `value` the datum.
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(mask.unwrap_or(0)),
    }
}

/// Compiles `profile` into a program (the expensive step: several milliseconds of CPU).
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, BpfError> {
    precompilable(profile).map_err(|why| BpfError::Compile(format!("this profile cannot be precompiled: {why}")))?;
    let fail = |what: &str, e: libseccomp::error::SeccompError| BpfError::Compile(format!("{what}: {e}"));
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|e| fail("new filter", e))?;
    for &a in profile.architectures().iter().flatten() {
        ctx.add_arch(arch(a)).map_err(|e| fail(&format!("architecture {a:?}"), e))?;
    }
    ctx.set_ctl_nnp(false).map_err(|e| fail("SCMP_FLTATR_CTL_NNP", e))?;
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let comparisons: Vec<ScmpArgCompare> = rule
            .args()
            .iter()
            .flatten()
            .map(|a| ScmpArgCompare::new(a.index() as u32, op(a.op(), a.value_two()), a.value()))
            .collect();
        let mut seen = HashSet::new();
        let repeated = rule.args().iter().flatten().any(|a| !seen.insert(a.index()));
        for name in rule.names() {
            // Names this libseccomp does not know are newer than it: nothing to filter.
            let Ok(call) = ScmpSyscall::from_name(name) else {
                tracing::debug!("seccomp: {name} is unknown to this libseccomp; skipped");
                continue;
            };
            let added = if rule.args().is_none() {
                ctx.add_rule(act, call).map(|_| ())
            } else if repeated {
                // libseccomp takes one comparison per argument in a rule: one rule each.
                comparisons.iter().try_for_each(|c| ctx.add_rule_conditional(act, call, &[*c]).map(|_| ()))
            } else {
                ctx.add_rule_conditional(act, call, &comparisons).map(|_| ())
            };
            added.map_err(|e| fail(&format!("rule for {name}"), e))?;
        }
    }
    // libseccomp 2.5 exports to a descriptor only: an anonymous file, read back.
    let mut file = memfd("dlv-seccomp").map_err(|e| BpfError::Compile(format!("memfd: {e}")))?;
    ctx.export_bpf(&file).map_err(|e| fail("export", e))?;
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| BpfError::Compile(format!("reading the exported program: {e}")))?;
    Program::from_bytes(&bytes)
}

fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid C string for the call; the returned descriptor is new and ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The cache key of a profile: its JSON, the libseccomp that compiles it, this architecture and
/// the cache layout. A different libseccomp may compile differently, so it gets its own entry.
pub fn cache_key(profile_json: &[u8]) -> String {
    let version = libseccomp::ScmpVersion::current().map(|v| v.to_string()).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(MAGIC);
    h.update(std::env::consts::ARCH.as_bytes());
    h.update(b"\0");
    h.update(version.as_bytes());
    h.update(b"\0");
    h.update(profile_json);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The program for `profile` (whose JSON text is `profile_json`), from the cache in `dir` or
/// compiled and stored there. A cache entry that fails its checksum is compiled again; a cache
/// that cannot be written costs a compile next time, nothing more.
pub fn cached(profile_json: &[u8], profile: &LinuxSeccomp, dir: &Path) -> Result<Program, BpfError> {
    let path = dir.join(format!("{}.bpf", cache_key(profile_json)));
    match std::fs::read(&path) {
        Ok(bytes) => match decode(&bytes) {
            Ok(program) => return Ok(program),
            Err(e) => tracing::warn!("{}: {e}; compiling the profile again", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(BpfError::Cache { path, source: e }),
    }
    let program = compile(profile)?;
    if let Err(e) = store(&path, &program) {
        tracing::warn!("cannot cache the seccomp program: {e}");
    }
    Ok(program)
}

/// The program for `profile`, cached in `dir` under the key of its OCI JSON form: the shim and
/// `exec` share entries.
pub fn for_profile(profile: &LinuxSeccomp, dir: &Path) -> Result<Program, BpfError> {
    let json = serde_json::to_vec(profile).map_err(|e| BpfError::Compile(format!("serialising the profile: {e}")))?;
    cached(&json, profile, dir)
}

/// Cache file: magic, SHA-256 of the program, the program.
fn decode(bytes: &[u8]) -> Result<Program, BpfError> {
    let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(|| BpfError::Invalid("not a program file".into()))?;
    if rest.len() < 32 {
        return Err(BpfError::Invalid("truncated".into()));
    }
    let (sum, program) = rest.split_at(32);
    if Sha256::digest(program).as_slice() != sum {
        return Err(BpfError::Invalid("checksum mismatch".into()));
    }
    Program::from_bytes(program)
}

fn store(path: &Path, program: &Program) -> Result<(), BpfError> {
    let cache = |source| BpfError::Cache { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(cache)?;
    }
    let bytes = program.to_bytes();
    // Written aside and renamed: concurrent shims never read a half-written file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(MAGIC)?;
        f.write_all(&Sha256::digest(&bytes))?;
        f.write_all(&bytes)
    });
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(cache(e));
    }
    Ok(())
}

/// Runs the container's process as `inner` does, but first loads a precompiled seccomp filter.
/// It is loaded in `validate`, the hook libcontainer calls in the init once namespaces, mounts,
/// pivot_root, capabilities and no_new_privs are in place, at the point where libcontainer
/// itself loads a profile under no_new_privs; a failure fails the container's creation, so
/// nothing ever runs unfiltered.
#[derive(Clone)]
pub struct FilteredExecutor {
    program: Program,
    inner: Box<dyn Executor>,
}

impl FilteredExecutor {
    pub fn new(program: Program, inner: Box<dyn Executor>) -> Self {
        FilteredExecutor { program, inner }
    }
}

impl Executor for FilteredExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.inner.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        self.inner.validate(spec)?;
        self.program.install().map_err(|e| ExecutorValidationError::ArgValidationError(e.to_string()))
    }

    fn setup_envs(&self, envs: std::collections::HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        self.inner.setup_envs(envs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(caps: &[&str]) -> (Vec<u8>, LinuxSeccomp) {
        let caps: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
        let json = crate::seccomp::profile(&caps);
        (serde_json::to_vec(&json).unwrap(), serde_json::from_value(json).unwrap())
    }

    /// Runs `body` in a forked child under no_new_privs and returns its exit code: a filter
    /// cannot be unloaded, so the test process must never load one itself.
    fn in_child(body: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only makes raw syscalls and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: prctl with integer arguments; _exit ends the child without unwinding.
                unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    libc::_exit(body())
                }
            }
            nix::unistd::ForkResult::Parent { child } => match nix::sys::wait::waitpid(child, None).unwrap() {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("child ended with {other:?}"),
            },
        }
    }

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    #[test]
    fn the_compiled_profile_blocks_and_allows_what_the_profile_says() {
        let (_, p) = profile(&[]);
        let program = compile(&p).expect("our profile compiles");
        assert!(program.instructions() > 10, "{program:?}");
        // Bit per check: keyctl EPERM, unshare EPERM, clone3 ENOSYS, getpid allowed,
        // personality(0xffffffff) allowed, socket(AF_VSOCK) EPERM.
        let code = in_child(|| {
            if program.install().is_err() {
                return 99;
            }
            let mut bits = 0;
            // SAFETY: raw syscalls with integer or null arguments; each fails or has no effect.
            unsafe {
                bits |= i32::from(errno_of(libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)) == libc::EPERM);
                bits |= i32::from(errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUTS)) == libc::EPERM) << 1;
                bits |= i32::from(errno_of(libc::syscall(libc::SYS_clone3, 0, 0)) == libc::ENOSYS) << 2;
                bits |= i32::from(libc::syscall(libc::SYS_getpid) > 0) << 3;
                bits |= i32::from(libc::syscall(libc::SYS_personality, 0xffff_ffffu64) >= 0) << 4;
                bits |=
                    i32::from(errno_of(libc::syscall(libc::SYS_socket, 40, libc::SOCK_STREAM, 0)) == libc::EPERM) << 5;
            }
            bits
        });
        assert_eq!(code, 0b11_1111, "bits of the checks that held: {code:#b}");
    }

    #[test]
    fn capabilities_change_the_program() {
        let (_, plain) = profile(&[]);
        let (_, admin) = profile(&["CAP_SYS_ADMIN"]);
        assert_ne!(compile(&plain).unwrap(), compile(&admin).unwrap());
        assert_eq!(compile(&plain).unwrap(), compile(&plain).unwrap(), "compiling is deterministic");
    }

    #[test]
    fn programs_the_kernel_would_refuse_are_refused_early() {
        assert!(Program::from_bytes(&[]).is_err());
        assert!(Program::from_bytes(&[0; 12]).is_err());
        assert!(Program::from_bytes(&vec![0; 8 * (MAX_INSTRUCTIONS + 1)]).is_err());
        // A well-formed instruction the kernel rejects: loading fails, nothing runs unfiltered.
        let bad = Program::from_bytes(&[0xff, 0xff, 0, 0, 0, 0, 0, 0]).unwrap();
        let code = in_child(|| match bad.install() {
            Err(BpfError::Install(e)) if e.raw_os_error() == Some(libc::EINVAL) => 0,
            Err(_) => 2,
            Ok(()) => 1,
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn the_cache_compiles_once_and_heals_a_damaged_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (json, p) = profile(&[]);
        let first = cached(&json, &p, dir.path()).unwrap();
        let entry = dir.path().join(format!("{}.bpf", cache_key(&json)));
        let stored = std::fs::read(&entry).unwrap();
        assert!(stored.starts_with(MAGIC));
        assert_eq!(decode(&stored).unwrap(), first);
        // Damaged: one flipped bit in the program fails the checksum and is compiled again.
        let mut damaged = stored.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        std::fs::write(&entry, &damaged).unwrap();
        assert!(matches!(decode(&damaged), Err(BpfError::Invalid(_))));
        assert_eq!(cached(&json, &p, dir.path()).unwrap(), first);
        assert_eq!(std::fs::read(&entry).unwrap(), stored, "the entry was rewritten");
        // Another profile, another entry.
        let (json2, _) = profile(&["CAP_SYS_ADMIN"]);
        assert_ne!(cache_key(&json), cache_key(&json2));
    }

    #[test]
    fn profiles_with_load_time_features_are_not_precompiled() {
        let (_, p) = profile(&[]);
        assert!(precompilable(&p).is_ok());
        let mut v = crate::seccomp::profile(&[]);
        v["flags"] = serde_json::json!(["SECCOMP_FILTER_FLAG_LOG"]);
        let flagged: LinuxSeccomp = serde_json::from_value(v).unwrap();
        assert!(precompilable(&flagged).is_err());
        assert!(compile(&flagged).is_err());
    }
}
