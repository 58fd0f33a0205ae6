//! Network namespace handles. Namespace switches happen only on short-lived dedicated threads:
//! a tokio worker must never change namespace, or unrelated tasks would run in the wrong one.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{io, sys, DataplaneError, Result};

/// Where named namespaces live, as with `ip netns`.
pub const NETNS_DIR: &str = "/run/netns";

/// An open network namespace (a file descriptor of its nsfs inode).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Open the namespace at `path` (a bind mount such as /run/netns/NAME, or /proc/PID/ns/net).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataplaneError::NotFound(format!(
                    "network namespace {} does not exist",
                    path.display()
                ))
            } else {
                DataplaneError::Io {
                    op: format!("opening netns {}", path.display()),
                    source: e,
                }
            }
        })?;
        // A plain file left behind by an interrupted bind mount is not a namespace: setns would
        // fail later with a confusing EINVAL, so check the filesystem type now.
        let st = nix::sys::statfs::fstatfs(file.as_fd())
            .map_err(sys(format!("statfs {}", path.display())))?;
        if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC
            && st.filesystem_type() != nix::sys::statfs::PROC_SUPER_MAGIC
        {
            return Err(DataplaneError::NotFound(format!(
                "{} is not a network namespace",
                path.display()
            )));
        }
        Ok(Netns { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Netns> {
        Netns::open("/proc/thread-self/ns/net")
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw descriptor (valid while `self` lives).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Path of a named namespace.
    pub fn named_path(name: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(name)
    }

    /// Create a named namespace, like `ip netns add NAME`.
    pub fn create_named(name: &str) -> Result<Netns> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(DataplaneError::Conflict(format!(
                "invalid netns name {name:?}"
            )));
        }
        ensure_netns_dir()?;
        let target = Netns::named_path(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    DataplaneError::Conflict(format!("network namespace {name} already exists"))
                }
                _ => DataplaneError::Io {
                    op: format!("creating {}", target.display()),
                    source: e,
                },
            })?;
        let t = target.clone();
        let made = std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare(CLONE_NEWNET)"))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &t,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys(format!(
                "bind-mounting the new netns on {}",
                t.display()
            )))
        })
        .join()
        .map_err(|_| DataplaneError::NotFound("netns creation thread panicked".into()))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&target);
            return Err(e);
        }
        Netns::open(&target)
    }

    /// Remove a named namespace (it lives on while processes are in it); false if absent.
    pub fn delete_named(name: &str) -> Result<bool> {
        let target = Netns::named_path(name);
        if !target.exists() {
            return Ok(false);
        }
        match umount2(&target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => {
                return Err(DataplaneError::Nix {
                    op: format!("unmounting {}", target.display()),
                    source: e,
                })
            }
        }
        std::fs::remove_file(&target).map_err(io(format!("removing {}", target.display())))?;
        Ok(true)
    }

    /// Run `f` on a fresh OS thread inside this namespace.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let fd = self.file.try_clone().map_err(io("duplicating netns fd"))?;
        let path = self.path.display().to_string();
        std::thread::spawn(move || -> Result<T> {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(sys(format!("entering netns {path}")))?;
            Ok(f())
        })
        .join()
        .map_err(|_| DataplaneError::NotFound("thread in netns panicked".into()))?
    }
}

/// Make /run/netns a shared mount point, as iproute2 does, so namespaces mounted there are seen
/// from every mount namespace.
fn ensure_netns_dir() -> Result<()> {
    std::fs::create_dir_all(NETNS_DIR).map_err(io(format!("creating {NETNS_DIR}")))?;
    let shared = |_: ()| {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared(()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself, then share it.
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(sys(format!("bind-mounting {NETNS_DIR}")))?;
            shared(()).map_err(sys(format!("making {NETNS_DIR} shared")))
        }
        Err(e) => Err(DataplaneError::Nix {
            op: format!("making {NETNS_DIR} shared"),
            source: e,
        }),
    }
}
