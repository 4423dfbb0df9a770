//! The hung-rank watchdog of a data-parallel run: a thread on every rank that ends the whole job
//! (`MPI_Abort`) when no collective has completed for `--dist-timeout` seconds while the step
//! loop runs. A dead rank ends the job through MPI itself; a hung one (stopped, deadlocked,
//! stuck on a device or a file system) would otherwise hold every other rank in its next
//! all-reduce for ever. The rank that fires logs its rank, the step and what it was waiting in.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

impl Watchdog {
    /// Starts the watchdog thread (disarmed); `abort` ends the job.
    pub fn start(rank: usize, timeout: Duration, abort: fn(i32) -> !) -> Arc<Self> {
        let w = Arc::new(Self {
            rank,
            timeout,
            started: Instant::now(),
            last_done_ms: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            step: AtomicU64::new(0),
            waiting_in: Mutex::new(""),
        });
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
            let Some(idle) = self.overdue() else { continue };
            let step = self.step.load(Ordering::SeqCst);
            let what = self.waiting_in.lock().map_or("", |w| *w);
            let doing = match what {
                "" => "not in a collective: this rank itself is stuck (data, device or file system)".to_string(),
                w => format!("waiting in the {w}: another rank is hung or stopped"),
            };
            say_err!(
                "rank {}: no collective completed for {idle:.1} s at step {step} ({doing}); --dist-timeout is {} s: \
                 aborting the job (exit {WATCHDOG_EXIT})",
                self.rank,
                self.timeout.as_secs_f64()
            );
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
        Watchdog {
            rank,
            timeout: Duration::from_secs(1),
            started: Instant::now(),
            last_done_ms: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            step: AtomicU64::new(0),
            waiting_in: Mutex::new(""),
        }
    }
}
