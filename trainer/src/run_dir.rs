//! Run directories that never lose work: a fresh run refuses a directory that holds a run
//! (unless told to continue it or to start over, which moves the old run aside, never deletes
//! it), default names are unique even for runs started in the same second, and an advisory
//! lock (`DIR/.lock`, `flock`) keeps a second trainer out of a directory in use.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::CaeError;
use crate::checkpoint::CHECKPOINT_DIR;
use crate::train::{CONFIG_FILE, STEP_LOG};

/// Name of the lock file in a run directory.
pub const LOCK_FILE: &str = ".lock";

/// What a run leaves in its directory before its first checkpoint.
const RUN_MARKERS: [&str; 3] = [CONFIG_FILE, STEP_LOG, CHECKPOINT_DIR];

/// An exclusive lock on a run directory, held until dropped (or the process ends: the kernel
/// releases a dead process's `flock`, so its lock is simply taken over).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

/// Whether `dir` holds a run: a checkpoint. A directory with only what a failed start left (a
/// config, an empty step log, a lock) is empty for a fresh run (its retry must not need
/// `--force`), and `--resume` finds nothing in it.
pub fn holds_run(dir: &Path) -> bool {
    crate::checkpoint::list(&dir.join(CHECKPOINT_DIR)).is_ok_and(|l| !l.is_empty())
}

/// Whether `dir` holds what a run without a checkpoint left that is worth keeping: a step log
/// with lines (a fresh run moves it aside rather than truncate it).
pub fn has_leftovers(dir: &Path) -> bool {
    RUN_MARKERS.iter().any(|m| dir.join(m).exists()) && fs::metadata(dir.join(STEP_LOG)).is_ok_and(|m| m.len() > 0)
}

/// Checks, without creating anything, that a file can be written at `path` (an output such as
/// `trainer features --out`, checked before the hours of work that produce it).
pub fn check_file_writable(path: &Path) -> Result<(), CaeError> {
    if path.is_dir() {
        return Err(CaeError::Usage(format!("cannot write {}: it is a directory", path.display())));
    }
    check_writable(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Checks, without creating anything, that `dir` can be written: it is a writable directory, or
/// the nearest folder above it that exists is one (so it can be made there).
pub fn check_writable(dir: &Path) -> Result<(), CaeError> {
    let absolute = std::path::absolute(dir).map_err(CaeError::io(dir))?;
    let existing = absolute.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let problem = if !existing.is_dir() {
        Some(format!("{} is not a directory", existing.display()))
    } else {
        // An unnamed temporary file (O_TMPFILE where the OS has it): nothing is left behind.
        tempfile::tempfile_in(existing).err().map(|e| format!("{} is not writable: {e}", existing.display()))
    };
    match problem {
        Some(p) => Err(CaeError::Usage(format!("cannot write {}: {p}", dir.display()))),
        None => Ok(()),
    }
}

fn host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown host".into())
}

/// Creates `dir` if needed and takes its lock; another live trainer on it is an error naming
/// its pid and host.
pub fn lock(dir: &Path) -> Result<RunLock, CaeError> {
    fs::create_dir_all(dir).map_err(CaeError::io(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(CaeError::io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            return Err(CaeError::Usage(format!(
                "{} is in use by another trainer ({}); wait for it or use another --out",
                dir.display(),
                holder.trim()
            )));
        }
        Err(fs::TryLockError::Error(e)) => return Err(CaeError::Io { path, source: e }),
    }
    let me = format!("pid {} on {}\n", std::process::id(), host());
    file.set_len(0).and_then(|_| file.write_all(me.as_bytes())).map_err(CaeError::io(&path))?;
    Ok(RunLock { _file: file, path })
}

/// Moves everything in `dir` but its lock into `dir/replaced-<stamp>/` (`--force`), and
/// returns that directory.
pub fn move_aside(dir: &Path, stamp: &str) -> Result<PathBuf, CaeError> {
    let mut aside = dir.join(format!("replaced-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = dir.join(format!("replaced-{stamp}-{n}"));
    }
    fs::create_dir(&aside).map_err(CaeError::io(&aside))?;
    for entry in fs::read_dir(dir).map_err(CaeError::io(dir))? {
        let entry = entry.map_err(CaeError::io(dir))?;
        let name = entry.file_name();
        let keep = name == LOCK_FILE || entry.path() == aside || name.to_string_lossy().starts_with("replaced-");
        if !keep {
            let to = aside.join(&name);
            fs::rename(entry.path(), &to).map_err(CaeError::io(&to))?;
        }
    }
    Ok(aside)
}

/// Creates a fresh run directory `base`, or `base-2`, `base-3`, ... when taken (atomic: two runs
/// started in the same second get different directories).
pub fn create_unique(base: &Path) -> Result<PathBuf, CaeError> {
    if let Some(parent) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(CaeError::io(parent))?;
    }
    for n in 1..10_000 {
        let dir = if n == 1 { base.to_path_buf() } else { PathBuf::from(format!("{}-{n}", base.display())) };
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(CaeError::Io { path: dir, source: e }),
        }
    }
    Err(CaeError::Usage(format!("no free run directory name next to {}", base.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_a_dropped_one_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock(tmp.path()).unwrap();
        let e = lock(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another trainer") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        lock(tmp.path()).expect("released with its holder");
    }

    #[test]
    fn unique_names_and_move_aside_keep_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("runs/20261203-120000");
        let a = create_unique(&base).unwrap();
        let b = create_unique(&base).unwrap();
        assert_ne!(a, b);
        assert!(b.to_string_lossy().ends_with("-2"));
        fs::write(a.join(CONFIG_FILE), "x").unwrap();
        fs::create_dir(a.join(CHECKPOINT_DIR)).unwrap();
        fs::write(a.join(CHECKPOINT_DIR).join("step-1.ckpt"), "c").unwrap();
        assert!(holds_run(&a) && !holds_run(&b));
        assert!(!has_leftovers(&b));
        check_writable(&b.join("not/yet/made")).expect("made under a writable folder");
        let file = b.join("file");
        fs::write(&file, "").unwrap();
        let e = check_writable(&file.join("run")).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        let _lock = lock(&a).unwrap();
        let aside = move_aside(&a, "t").unwrap();
        assert!(!holds_run(&a) && a.join(LOCK_FILE).exists());
        assert_eq!(fs::read_to_string(aside.join(CONFIG_FILE)).unwrap(), "x");
        assert_eq!(fs::read_to_string(aside.join(CHECKPOINT_DIR).join("step-1.ckpt")).unwrap(), "c");
        fs::write(a.join(STEP_LOG), "y").unwrap();
        let again = move_aside(&a, "t").unwrap();
        assert_ne!(again, aside);
        assert!(aside.join(CONFIG_FILE).exists(), "an earlier replaced run stays where it was");
    }
}
