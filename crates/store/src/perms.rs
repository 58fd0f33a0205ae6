//! The store is root's: its directory 0700, its files 0600, created so and tightened when found
//! looser. Whoever reads the store learns every network; whoever writes it (or holds its lock)
//! controls every host, so no other user may do either.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::{Result, StoreError};

/// Mode of the store file and its lock file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a directory that holds the store.
pub const DIR_MODE: u32 = 0o700;

/// The mode `mode` should be changed to so that only its owner has access, if it is not so
/// already. A sticky directory (`/tmp` and the like) is shared by design and is left alone.
pub fn tightened(mode: u32, private: u32) -> Option<u32> {
    let perm = mode & 0o7777;
    if perm & 0o1000 != 0 {
        return None;
    }
    (perm & 0o077 != 0).then_some(perm & !0o077 & 0o7777 | (private & 0o700))
}

fn io<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::Io(format!("{what} {}: {e}", path.display()))
}

/// Create `dir` (and missing parents) as 0700, or tighten it to that when it exists looser.
pub fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io("create", dir))?;
    let meta = std::fs::metadata(dir).map_err(io("stat", dir))?;
    if let Some(mode) = tightened(meta.mode(), DIR_MODE) {
        tracing::warn!(dir = %dir.display(), from = format!("{:o}", meta.mode() & 0o7777), to = format!("{mode:o}"), "tightening the store directory");
        std::fs::set_permissions(dir, Permissions::from_mode(mode)).map_err(io("chmod", dir))?;
    }
    Ok(())
}

/// Open (creating as 0600 if missing) a store file read-write, tightening its mode and, when
/// this process is root, giving it to root: a file another user owns is that user's to change.
pub fn open_private_file(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io("open", path))?;
    let meta = file.metadata().map_err(io("stat", path))?;
    let euid = nix::unistd::geteuid().as_raw();
    if euid == 0 && meta.uid() != 0 {
        std::os::unix::fs::fchown(&file, Some(0), Some(0)).map_err(io("chown", path))?;
    }
    if let Some(mode) = tightened(meta.mode(), FILE_MODE) {
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(io("chmod", path))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_keeps_access() {
        assert_eq!(tightened(0o100644, FILE_MODE), Some(0o600));
        assert_eq!(tightened(0o100666, FILE_MODE), Some(0o600));
        assert_eq!(tightened(0o100600, FILE_MODE), None);
        assert_eq!(tightened(0o100400, FILE_MODE), None);
        assert_eq!(tightened(0o040755, DIR_MODE), Some(0o700));
        assert_eq!(tightened(0o040711, DIR_MODE), Some(0o700));
        assert_eq!(tightened(0o040700, DIR_MODE), None);
        // /tmp: shared on purpose, never made private.
        assert_eq!(tightened(0o041777, DIR_MODE), None);
    }

    #[test]
    fn files_and_dirs_are_made_private() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        let f = dir.join("store.redb");
        std::fs::write(&f, b"").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        open_private_file(&f).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o7777, 0o600);
        let g = dir.join("new.lock");
        open_private_file(&g).unwrap();
        assert_eq!(std::fs::metadata(&g).unwrap().mode() & 0o7777, 0o600);
    }
}
