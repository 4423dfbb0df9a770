//! The hung-rank watchdog of a data-parallel run: a thread on every rank that ends the whole job
//! (`MPI_Abort`) when no collective has completed for `--dist-timeout` seconds while the step
//! loop runs. A dead rank ends the job through MPI itself; a hung one (stopped, deadlocked,
//! stuck on a device or a file system) would otherwise hold every other rank in its next
//! all-reduce for ever. The rank that fires logs its rank, the step and what it was waiting in,
//! and names the ranks that stopped answering: every rank's watchdog thread refreshes a
//! heartbeat file (`<run dir>/ranks/rank-N`: its step and what it is doing) about once a
//! second, so a rank whose heartbeat went stale while the others' stayed fresh is the hung one
//! (a stopped process stops its watchdog thread too).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Exit status of a job ended by the watchdog.
pub const WATCHDOG_EXIT: i32 = 124;

/// Shared between the step loop (which reports progress) and the watchdog thread.
pub struct Watchdog {
    rank: usize,
    timeout: Duration,
    started: Instant,
    /// Milliseconds since `started` of the last completed collective (or of arming).
    last_done_ms: AtomicU64,
    armed: AtomicBool,
    step: AtomicU64,
    /// The collective in flight (empty between collectives).
    waiting_in: Mutex<&'static str>,
    /// Where the ranks' heartbeat files are (once the run directory is known).
    heartbeats: Mutex<Option<PathBuf>>,
}

impl Watchdog {
    /// A disarmed watchdog of `rank`, without its thread.
    fn new(rank: usize, timeout: Duration) -> Self {
        Self {
            rank,
            timeout,
            started: Instant::now(),
            last_done_ms: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            step: AtomicU64::new(0),
            waiting_in: Mutex::new(""),
            heartbeats: Mutex::new(None),
        }
    }

    /// Starts the watchdog thread (disarmed); `abort` ends the job.
    pub fn start(rank: usize, timeout: Duration, abort: fn(i32) -> !) -> Arc<Self> {
        let w = Arc::new(Self::new(rank, timeout));
        let watched = Arc::clone(&w);
        let spawned = std::thread::Builder::new().name("dist-watchdog".into()).spawn(move || watched.watch(abort));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the data-parallel watchdog thread: {e}; a hung rank will not be detected");
        }
        w
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn arm(&self, step: u64) {
        self.step.store(step, Ordering::SeqCst);
        self.last_done_ms.store(self.now_ms(), Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Starts this rank's heartbeat file in `dir` (shared by the ranks: the run directory's).
    pub fn heartbeat_in(&self, dir: PathBuf) {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("heartbeat folder {}: {e}; a hung rank will not be named", dir.display());
        }
        if let Ok(mut h) = self.heartbeats.lock() {
            *h = Some(dir);
        }
        self.beat(); // at once: a rank may hang before the thread's first tick
    }

    fn beat(&self) {
        let Some(dir) = self.heartbeats.lock().ok().and_then(|h| h.clone()) else { return };
        let what = self.waiting_in.lock().map_or("", |w| *w);
        let line =
            format!("step {} {}\n", self.step.load(Ordering::SeqCst), if what.is_empty() { "computing" } else { what });
        let _ = std::fs::write(dir.join(format!("rank-{}", self.rank)), line);
    }

    /// The ranks whose heartbeat is stale (more than `stale` older than the freshest), with what
    /// each last said.
    fn silent_ranks(&self, stale: Duration) -> Vec<(usize, String, f64)> {
        let Some(dir) = self.heartbeats.lock().ok().and_then(|h| h.clone()) else { return Vec::new() };
        let mut beats: Vec<(usize, String, SystemTime)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let rank = e.file_name().to_str()?.strip_prefix("rank-")?.parse().ok()?;
                let modified = e.metadata().ok()?.modified().ok()?;
                let said = std::fs::read_to_string(e.path()).ok()?.trim().to_string();
                Some((rank, said, modified))
            })
            .collect();
        let Some(newest) = beats.iter().map(|b| b.2).max() else { return Vec::new() };
        beats.sort_by_key(|b| b.0);
        beats
            .into_iter()
            .filter_map(|(rank, said, t)| {
                let age = newest.duration_since(t).unwrap_or_default();
                (age > stale).then_some((rank, said, age.as_secs_f64()))
            })
            .collect()
    }

    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::SeqCst);
    }

    pub fn entering(&self, what: &'static str) {
        if let Ok(mut w) = self.waiting_in.lock() {
            *w = what;
        }
    }

    pub fn completed(&self) {
        if let Ok(mut w) = self.waiting_in.lock() {
            *w = "";
        }
        self.last_done_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    /// Seconds since the last completed collective when that exceeds the timeout while armed.
    fn overdue(&self) -> Option<f64> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let idle = self.now_ms().saturating_sub(self.last_done_ms.load(Ordering::SeqCst));
        (Duration::from_millis(idle) > self.timeout).then_some(idle as f64 / 1000.0)
    }

    fn watch(&self, abort: fn(i32) -> !) {
        let tick = (self.timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            std::thread::sleep(tick);
            self.beat();
            let Some(idle) = self.overdue() else { continue };
            let step = self.step.load(Ordering::SeqCst);
            let what = self.waiting_in.lock().map_or("", |w| *w);
            let doing = match what {
                "" => "not in a collective: this rank itself is stuck (data, device or file system)".to_string(),
                w => format!("waiting in the {w}: another rank is hung or stopped"),
            };
            let silent: Vec<String> = self
                .silent_ranks(tick * 4 + Duration::from_millis(500))
                .into_iter()
                .map(|(rank, said, age)| {
                    format!("rank {rank} stopped answering (its last heartbeat, {said}, is {age:.1} s older than the others'); ")
                })
                .collect();
            // One line (launchers may drop what follows the first line of a dying process).
            let message = format!(
                "rank {}: no collective completed for {idle:.1} s at step {step} ({doing}); {}--dist-timeout is {} s: \
                 aborting the job (exit {WATCHDOG_EXIT})",
                self.rank,
                silent.concat(),
                self.timeout.as_secs_f64()
            );
            // A moment for the launcher to forward it before the job is torn down.
            say_err!("{message}");
            std::thread::sleep(Duration::from_millis(500));
            abort(WATCHDOG_EXIT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: i32) -> ! {
        panic!("the watchdog fired")
    }

    #[test]
    fn overdue_only_while_armed_and_only_after_the_timeout() {
        let w = Watchdog::start(1, Duration::from_secs(3600), never);
        assert_eq!(w.overdue(), None, "disarmed");
        w.arm(5);
        assert_eq!(w.overdue(), None, "within the timeout");
        let quick = Watchdog { timeout: Duration::from_millis(20), ..unwatched(2) };
        quick.arm(7);
        std::thread::sleep(Duration::from_millis(60));
        assert!(quick.overdue().is_some_and(|s| s >= 0.02));
        quick.completed();
        assert_eq!(quick.overdue(), None, "a completed collective resets the clock");
        quick.disarm();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(quick.overdue(), None);
    }

    fn unwatched(rank: usize) -> Watchdog {
        Watchdog::new(rank, Duration::from_secs(1))
    }

    #[test]
    fn a_stale_heartbeat_names_its_rank() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ranks");
        let (a, b) = (unwatched(0), unwatched(1));
        a.heartbeat_in(dir.clone());
        b.heartbeat_in(dir.clone());
        b.set_step(3);
        b.beat();
        a.set_step(4);
        a.entering("all-reduce");
        std::thread::sleep(Duration::from_millis(120));
        a.beat();
        assert_eq!(
            a.silent_ranks(Duration::from_millis(60)).iter().map(|r| (r.0, r.1.as_str())).collect::<Vec<_>>(),
            [(1, "step 3 computing")]
        );
        assert!(a.silent_ranks(Duration::from_secs(5)).is_empty(), "within the slack");
    }
}
