//! Writing rendered files: only when the bytes differ, and atomically (a temporary file in the
//! same directory, fsynced, renamed over the old one), so a reader sees the old file or the new
//! one, never a part. The new file keeps the old one's mode and owner.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Mode of a file that did not exist before.
pub const DEFAULT_MODE: u32 = 0o644;

/// Whether `new` must be written over what the file holds now (`None`: no file).
pub fn changed(old: Option<&[u8]>, new: &[u8]) -> bool {
    old != Some(new)
}

/// What the file holds now, `None` when it does not exist.
pub fn current(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write `content` to `path` if it differs from the file's; true when it was written.
pub fn write_if_changed(path: &Path, content: &[u8]) -> io::Result<bool> {
    if !changed(current(path)?.as_deref(), content) {
        return Ok(false);
    }
    write_atomic(path, content)?;
    Ok(true)
}

/// Replace `path` with `content` atomically, keeping its mode and owner when it exists.
pub fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
    })?;
    let old = match fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    let mode = old.as_ref().map_or(DEFAULT_MODE, |m| m.mode() & 0o7777);
    if let Some(m) = &old {
        // Only root may give a file away; others keep what they can (the mode).
        match std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid())) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!(path = %path.display(), "cannot keep the file's owner: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    // After chown, which clears set-id bits.
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename itself survives a crash only once the directory is synced.
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn changed_compares_bytes() {
        assert!(changed(None, b""));
        assert!(changed(Some(b"a"), b"b"));
        assert!(!changed(Some(b"a"), b"a"));
    }

    #[test]
    fn rewrites_only_on_change_and_keeps_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.conf");
        assert!(write_if_changed(&p, b"one\n").unwrap());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, DEFAULT_MODE);
        fs::set_permissions(&p, Permissions::from_mode(0o640)).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        assert!(!write_if_changed(&p, b"one\n").unwrap());
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino, "untouched");
        assert!(write_if_changed(&p, b"two\n").unwrap());
        let m = fs::metadata(&p).unwrap();
        assert_ne!(m.ino(), ino, "replaced by rename");
        assert_eq!(m.mode() & 0o777, 0o640);
        assert_eq!(fs::read(&p).unwrap(), b"two\n");
        let left: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }
}
