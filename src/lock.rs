//! One server per data dir. A second server on the same dir would take the first one's live
//! processes for a crash's leftovers at start-up, kill its runs and delete their dirs, so
//! `serve` holds an exclusive `flock` on `DATA_DIR/clawdforge.lock` (which names the
//! holder's pid) for its whole life. The kernel drops the lock when the process dies,
//! however it dies, so a crash never leaves a stale lock. `tokens`, `doctor` and `backup`
//! do not take it: they are safe beside a running server.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Held while the server runs; dropping it releases the lock.
pub struct DataDirLock {
    _file: Flock<File>,
}

impl DataDirLock {
    /// Takes the lock or says who holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        let path = data_dir.join("clawdforge.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "unknown" } else { holder };
                anyhow::bail!(
                    "CLAWDFORGE_DATA_DIR {} is in use by another clawdforge server (pid {holder}); \
                     stop it or give this one its own data dir",
                    data_dir.display()
                );
            }
            Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
        };
        file.set_len(0)?;
        file.rewind()?;
        writeln!(&mut *file, "{}", std::process::id())?;
        file.flush()?;
        Ok(DataDirLock { _file: file })
    }
}
