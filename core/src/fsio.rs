//! The one way infl8 writes a file (segmentations, logits, previews,
//! reports, the watch service's records).
//!
//! Over a regular file or nothing the write is atomic: the bytes go to a
//! temporary name in the same folder, are fsynced, renamed over the target
//! and the folder is fsynced, so a reader (or a restart after a crash) sees
//! the old file or the whole new one. A character device or a FIFO is
//! written through instead (`--report /dev/null` must leave /dev/null a
//! device); a symbolic link is refused (a caller asked to replace links
//! removes them first); anything else (a folder, a block device, a socket)
//! is refused.
//!
//! Temporary names always fit `NAME_MAX`: `.<name>.<pid>-<n>.infl8-tmp`,
//! or `.<hash of name>.<pid>-<n>.infl8-tmp` when that would be too long.
//! [`is_temporary`] recognises them (the watch service skips and removes
//! them), [`temporary_prefix`] tells which belong to one target.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest file name (one path component) Linux filesystems accept, bytes.
pub const NAME_MAX: usize = 255;

const TEMP_SUFFIX: &str = ".infl8-tmp";

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{}: cannot {action}: {error}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    #[error("{}: {detail}", .path.display())]
    Refused { path: PathBuf, detail: String },
}

impl WriteError {
    /// The OS error behind it, if any.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            WriteError::Io { error, .. } => Some(error),
            WriteError::Refused { .. } => None,
        }
    }

    /// A full, read-only, over-quota or (for now) forbidden disk: a
    /// condition of the place written to that may pass, not a fault of
    /// what was written.
    pub fn is_transient(&self) -> bool {
        self.os_error().is_some_and(is_transient_io)
    }
}

/// See [`WriteError::is_transient`].
pub fn is_transient_io(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EROFS
                | libc::EACCES
                | libc::EPERM
                | libc::EIO
                | libc::EAGAIN
        )
    )
}

/// Writes `bytes` to `path` (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_with(path, |f| f.write_all(bytes).map_err(io_err(path, "write")))
}

/// Writes what `body` writes to the file it is given to `path` (see the
/// module docs). `body` need not flush or sync; an error from it (or a
/// panic) leaves no temporary file and the target as it was.
pub fn write_with<E>(path: &Path, body: impl FnOnce(&mut File) -> Result<(), E>) -> Result<(), E>
where
    E: From<WriteError>,
{
    let name = match check_target(path)? {
        Target::Device => return write_through(path, body),
        Target::File(name) => name,
    };
    replace(path, name, body)
}

/// What a write to a path does.
pub enum Target<'a> {
    /// Writes through to a character device or FIFO.
    Device,
    /// Creates or atomically replaces the regular file of this name.
    File(&'a OsStr),
}

/// Whether `path` can be written and how (see the module docs): an early
/// check for commands that would otherwise find out after their work.
pub fn check_target(path: &Path) -> Result<Target<'_>, WriteError> {
    let refuse = |detail: String| WriteError::Refused {
        path: path.to_path_buf(),
        detail,
    };
    let name = path
        .file_name()
        .ok_or_else(|| refuse("the path has no file name".into()))?;
    if name.len() > NAME_MAX {
        return Err(refuse(format!(
            "the file name is {} bytes, more than the {NAME_MAX} a file system allows",
            name.len()
        )));
    }
    let t = match fs::symlink_metadata(path) {
        Ok(m) => m.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Target::File(name)),
        Err(e) => return Err(io_err(path, "inspect")(e)),
    };
    if t.is_file() {
        Ok(Target::File(name))
    } else if t.is_char_device() || t.is_fifo() {
        Ok(Target::Device)
    } else if t.is_symlink() {
        Err(refuse(
            "is a symbolic link: refusing to replace it (give its target's own path, or \
             --replace-symlinks to replace the link)"
                .into(),
        ))
    } else if t.is_dir() {
        Err(refuse("is a folder, not a file".into()))
    } else {
        Err(refuse(
            "is a block device or a socket: refusing to write to it".into(),
        ))
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary file unless the write was committed, so errors
/// and panics alike leave no partial output behind.
struct TempGuard {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn replace<E: From<WriteError>>(
    path: &Path,
    name: &OsStr,
    body: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        "{}{}-{}{TEMP_SUFFIX}",
        temporary_prefix(name),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(path, "create a temporary file next to"))?;
    let mut guard = TempGuard {
        path: tmp,
        committed: false,
    };
    body(&mut file)?;
    file.sync_all().map_err(io_err(path, "fsync"))?;
    drop(file);
    fs::rename(&guard.path, path).map_err(io_err(path, "rename the temporary file to"))?;
    guard.committed = true;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path, "fsync the folder of"))?;
    Ok(())
}

/// A character device or FIFO: written in place, never replaced. A FIFO
/// nobody reads is an error rather than a hang.
fn write_through<E: From<WriteError>>(
    path: &Path,
    body: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENXIO) {
                WriteError::Refused {
                    path: path.to_path_buf(),
                    detail: "is a FIFO that no process is reading".into(),
                }
            } else {
                io_err(path, "open")(e)
            }
        })?;
    set_blocking(&file).map_err(io_err(path, "open"))?;
    body(&mut file)?;
    file.flush().map_err(io_err(path, "write"))?;
    Ok(())
}

fn set_blocking(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The start of every temporary name of a write to a file named `name`:
/// `.<name>.`, or `.<16 hex digits of its hash>.` when a temporary name
/// built from `name` could pass `NAME_MAX`.
pub fn temporary_prefix(name: &OsStr) -> String {
    // Room for `.`, `.`, a pid (10), `-`, a counter (20) and the suffix.
    const ROOM: usize = 2 + 10 + 1 + 20 + TEMP_SUFFIX.len();
    match name.to_str() {
        Some(s) if s.len() + ROOM <= NAME_MAX && !s.is_empty() => format!(".{s}."),
        _ => format!(".{:016x}.", fnv1a(name.as_bytes())),
    }
}

/// Removes the temporary files that process `pid` left while writing
/// `target` (it was killed mid-write); returns how many it removed.
pub fn remove_temporaries_of(target: &Path, pid: u32) -> io::Result<usize> {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Ok(0);
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mine = format!("{}{pid}-", temporary_prefix(name));
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let n = entry.file_name();
        if is_temporary(&n) && n.as_bytes().starts_with(mine.as_bytes()) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A temporary file of this module: never a complete file.
pub fn is_temporary(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b".") && b.ends_with(TEMP_SUFFIX.as_bytes())
}

/// `name`, or a shortened copy that still says what it was, cut to at most
/// `max` bytes: the first bytes that fit (on a char boundary), `-` and 12
/// hex digits of a hash of the whole name, so two long names that share a
/// beginning stay apart.
pub fn fit_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let tag = format!("-{:012x}", fnv1a(name.as_bytes()) & 0xffff_ffff_ffff);
    let mut cut = max.saturating_sub(tag.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tag}", &name[..cut])
}

/// FNV-1a, 64 bits: short stable names, not security.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |error| WriteError::Io {
        path: path.to_path_buf(),
        action,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_killed_writer_s_temporaries_are_found_and_only_they_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.nii.gz");
        let prefix = temporary_prefix(target.file_name().unwrap());
        for name in [
            format!("{prefix}4242-0{TEMP_SUFFIX}"),
            format!("{prefix}4242-7{TEMP_SUFFIX}"),
            format!("{prefix}42420-0{TEMP_SUFFIX}"),
            format!(".other.nii.gz.4242-0{TEMP_SUFFIX}"),
        ] {
            fs::write(dir.path().join(name), b"part").unwrap();
        }
        assert_eq!(remove_temporaries_of(&target, 4242).unwrap(), 2);
        assert_eq!(
            listing(dir.path()),
            [
                format!(".other.nii.gz.4242-0{TEMP_SUFFIX}"),
                format!("{prefix}42420-0{TEMP_SUFFIX}")
            ]
        );
    }

    #[test]
    fn replaces_a_regular_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(listing(dir.path()), ["r.json"]);
        // A failing body leaves the old file and no temporary.
        let r: Result<(), WriteError> = write_with(&p, |f| {
            f.write_all(b"half").unwrap();
            Err(WriteError::Refused {
                path: p.clone(),
                detail: "boom".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(listing(dir.path()), ["r.json"]);
    }

    #[test]
    fn a_character_device_is_written_through_and_stays_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fakenull");
        let dev = libc::makedev(1, 3);
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: mknod on a path in our own temporary folder.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, dev) } != 0 {
            let e = io::Error::last_os_error();
            panic!("mknod (the tests run as root): {e}");
        }
        write_atomic(&p, b"discarded").unwrap();
        let m = fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_char_device(), "still a device");
        assert_eq!(m.rdev(), dev);
        assert_eq!(listing(dir.path()), ["fakenull"]);
    }

    #[test]
    fn a_fifo_is_written_through_or_refused_without_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pipe");
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo on a path in our own temporary folder.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(
            e.contains("pipe") && e.contains("no process is reading"),
            "{e}"
        );
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || fs::read(&p).unwrap())
        };
        // The reader's open may come after ours: retry until it is there.
        let body = vec![7u8; 200_000];
        let mut tries = 0;
        while let Err(e) = write_atomic(&p, &body) {
            tries += 1;
            assert!(tries < 500, "{e}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reader.join().unwrap(), body, "more than a pipe buffer");
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_fifo());
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_never_touched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = write_atomic(&link, b"x").unwrap_err().to_string();
        assert!(e.contains("link") && e.contains("symbolic link"), "{e}");
        assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert_eq!(listing(dir.path()), ["link", "target"]);
    }

    #[test]
    fn a_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_atomic(dir.path(), b"x").unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
    }

    #[test]
    fn temporary_names_fit_name_max_for_the_longest_legal_name() {
        let dir = tempfile::tempdir().unwrap();
        for len in [1, 200, 220, 243, 255] {
            let name = "N".repeat(len);
            let p = dir.path().join(&name);
            write_atomic(&p, b"ok").unwrap();
            assert_eq!(fs::read(&p).unwrap(), b"ok", "{len}");
            let prefix = temporary_prefix(OsStr::new(&name));
            let longest = format!("{prefix}{}-{}{TEMP_SUFFIX}", u32::MAX, u64::MAX);
            assert!(longest.len() <= NAME_MAX, "{len}: {}", longest.len());
            assert!(is_temporary(OsStr::new(&longest)));
            fs::remove_file(&p).unwrap();
        }
        let e = write_atomic(&dir.path().join("N".repeat(256)), b"x").unwrap_err();
        assert!(e.to_string().contains("256 bytes"), "{e}");
        assert!(!is_temporary(OsStr::new("scan.nii.gz")));
        assert!(!is_temporary(OsStr::new(".hidden")));
    }

    #[test]
    fn fit_name_cuts_on_a_char_boundary_and_keeps_names_apart() {
        assert_eq!(fit_name("short", 10), "short");
        let a = format!("{}a", "ü".repeat(200));
        let b = format!("{}b", "ü".repeat(200));
        let (fa, fb) = (fit_name(&a, 100), fit_name(&b, 100));
        assert!(fa.len() <= 100 && fb.len() <= 100, "{fa}");
        assert_ne!(fa, fb);
        assert!(fa.starts_with("üü"));
    }
}
