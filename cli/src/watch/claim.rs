//! Claiming an inbox file, so that services sharing an inbox (each with its
//! own outbox) never both process one file.
//!
//! A claim is an exclusive `flock` on the open input, held until the input
//! is filed. Another service's claim makes the file busy (tried again
//! later); a file renamed or replaced between the listing and the lock is
//! gone (its path no longer names the inode locked). With `move_inputs`
//! (the default) the first service to finish moves the file out of the
//! inbox, so each input is processed exactly once; inputs left in place are
//! processed once by every service, one after the other.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub(super) enum Claimed {
    Ours(File),
    /// Another process holds it.
    Busy,
    /// Not there any more, or no longer the file listed.
    Gone,
}

/// Claims the file at `path` for this process.
pub(super) fn claim(path: &Path) -> io::Result<Claimed> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Claimed::Gone),
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(Claimed::Busy);
        }
        return Err(e);
    }
    let locked = file.metadata()?;
    let now = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Claimed::Gone),
        Err(e) => return Err(e),
    };
    if (locked.dev(), locked.ino()) != (now.dev(), now.ino()) {
        return Ok(Claimed::Gone);
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(Claimed::Ours(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_busy_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.nii");
        std::fs::write(&p, b"x").unwrap();
        let first = claim(&p).unwrap();
        assert!(matches!(first, Claimed::Ours(_)));
        assert!(matches!(claim(&p).unwrap(), Claimed::Busy));
        drop(first);
        assert!(matches!(claim(&p).unwrap(), Claimed::Ours(_)));
        assert!(matches!(
            claim(&dir.path().join("none")).unwrap(),
            Claimed::Gone
        ));
    }
}
