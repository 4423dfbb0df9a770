//! Data parallel across processes and machines (docs/scaling-out.md).
//!
//! A run launched by an MPI launcher (`mpirun`, `srun --mpi=pmix`, the Kubernetes MPI Operator)
//! with more than one process is one data-parallel group: every rank holds the whole model, reads
//! its own samples, and the ranks sum their gradients once per optimizer step
//! ([`crate::train`]'s reduce). This module is the seam between the step loop and the transport:
//!
//! - [`Collective`]: the few operations a run needs (sum, max, broadcast, all-gather, abort).
//!   Today one engine, MPI on host buffers ([`mpi_engine`], cargo feature `mpi`). An NCCL engine
//!   (cudarc's `nccl`, bootstrapped over MPI as Horovod does) would implement the same trait on
//!   device buffers; nothing above the trait changes.
//! - [`Dist`]: this process's place in the group (rank, world, local rank) and the engine, every
//!   call timed and watched by the [`watchdog`].
//! - [`launch`]: whether a launcher started this process (its environment variables).

pub mod launch;
#[cfg(feature = "mpi")]
mod mpi_engine;
mod watchdog;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cae_pipeline::LoaderState;

use crate::CaeError;
pub use watchdog::Watchdog;

/// The collective operations of a data-parallel run. Every rank calls the same operations in
/// the same order; a rank that dies ends the job (MPI's default error handler).
pub trait Collective {
    /// Element-wise sum over the ranks, in place.
    fn sum_f32(&self, buf: &mut [f32]);
    /// Element-wise maximum over the ranks, in place.
    fn max_u64(&self, buf: &mut [u64]);
    /// Rank 0's `bytes` on every rank (the others' input is replaced).
    fn broadcast(&self, bytes: &mut Vec<u8>);
    /// Every rank's `bytes`, in rank order, on every rank.
    fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>>;
    /// Ends every process of the job with `code` (MPI_Abort).
    fn abort(&self, code: i32) -> !;
}

/// This process's place in a data-parallel group (`world == 1`: a single-process run).
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    /// Rank among the processes on this machine (it picks the GPU), and their number.
    pub local_rank: usize,
    pub local_world: usize,
    engine: Option<Box<dyn Collective>>,
    watchdog: Option<Arc<Watchdog>>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist(rank {} of {}, local {} of {})", self.rank, self.world, self.local_rank, self.local_world)
    }
}

impl Default for Dist {
    fn default() -> Self {
        Self::single()
    }
}

impl Dist {
    /// One process, no group.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, local_rank: 0, local_world: 1, engine: None, watchdog: None }
    }

    /// The group this process belongs to: MPI's when a launcher started more than one process
    /// (feature `mpi`), else a single process. Launched by a launcher into a binary built
    /// without `mpi`: a usage error, never N independent runs writing one run dir.
    pub fn init(timeout: Duration) -> Result<Self, CaeError> {
        let Some(launcher) = launch::detect() else { return Ok(Self::single()) };
        Self::init_launched(launcher, timeout)
    }

    #[cfg(feature = "mpi")]
    fn init_launched(_launcher: launch::Launcher, timeout: Duration) -> Result<Self, CaeError> {
        let (engine, place) = mpi_engine::MpiEngine::init()?;
        if place.world == 1 {
            return Ok(Self::single());
        }
        let watchdog = Watchdog::start(place.rank, timeout, mpi_engine::abort_job);
        Ok(Self {
            rank: place.rank,
            world: place.world,
            local_rank: place.local_rank,
            local_world: place.local_world,
            engine: Some(Box::new(engine)),
            watchdog: Some(watchdog),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_launched(launcher: launch::Launcher, _timeout: Duration) -> Result<Self, CaeError> {
        Err(CaeError::Usage(format!(
            "started by {} as one of {} processes, but this trainer was built without MPI: every process would \
             run alone into the same run directory. Rebuild with `cargo build --release -p cae-trainer --features \
             mpi` (needs libopenmpi-dev or MPICH, and libclang-dev), or start one process",
            launcher.name, launcher.processes
        )))
    }

    /// Whether this process is one of several.
    pub fn is_parallel(&self) -> bool {
        self.world > 1
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Runs one collective under the watchdog; returns its result and the seconds it took.
    fn watched<T>(&self, what: &'static str, f: impl FnOnce(&dyn Collective) -> T) -> Option<(T, f64)> {
        let engine = self.engine.as_deref()?;
        let started = Instant::now();
        if let Some(w) = &self.watchdog {
            w.entering(what);
        }
        let out = f(engine);
        if let Some(w) = &self.watchdog {
            w.completed();
        }
        Some((out, started.elapsed().as_secs_f64()))
    }

    /// Sums `buf` over the ranks in place; returns the seconds spent (0 for one process).
    pub fn sum_f32(&self, buf: &mut [f32]) -> f64 {
        self.watched("all-reduce", |e| e.sum_f32(buf)).map_or(0.0, |(_, s)| s)
    }

    /// Rank 0's bytes on every rank.
    pub fn broadcast(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        self.watched("broadcast", |e| e.broadcast(&mut bytes));
        bytes
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.watched("all-gather", |e| e.all_gather(bytes)).map_or_else(|| vec![bytes.to_vec()], |(v, _)| v)
    }

    /// Rank 0's string on every rank.
    pub fn broadcast_string(&self, s: &str) -> String {
        String::from_utf8_lossy(&self.broadcast(s.as_bytes().to_vec())).into_owned()
    }

    /// Whether every rank holds the same 64-bit `digest` (a max over ranks of it and of its
    /// complement).
    pub fn same_everywhere(&self, digest: u64) -> bool {
        let mut v = [digest, !digest];
        self.watched("digest check", |e| e.max_u64(&mut v));
        v[0] == digest && v[1] == !digest
    }

    /// Every rank's loader state, in rank order (a checkpoint holds them all).
    pub fn gather_loader_states(&self, mine: LoaderState) -> Result<Vec<LoaderState>, CaeError> {
        let bytes = serde_json::to_vec(&mine).map_err(|e| CaeError::Data(format!("loader state: {e}")))?;
        self.all_gather(&bytes)
            .iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice(b).map_err(|e| CaeError::Data(format!("loader state of rank {r}: {e}")))
            })
            .collect()
    }

    /// Where the watchdog keeps this rank's heartbeat (a folder every rank sees: the run
    /// directory's `ranks/`), so that the rank that fires can name a silent one.
    pub fn heartbeat_in(&self, dir: std::path::PathBuf) {
        if let Some(w) = &self.watchdog {
            w.heartbeat_in(dir);
        }
    }

    /// Arms the watchdog (at the first step: setup may take long, a step may not), with the
    /// step the loop is at.
    pub fn arm_watchdog(&self, step: u64) {
        if let Some(w) = &self.watchdog {
            w.arm(step);
        }
    }

    /// The step the watchdog names when it fires.
    pub fn set_step(&self, step: u64) {
        if let Some(w) = &self.watchdog {
            w.set_step(step);
        }
    }

    /// Disarms the watchdog (the loop is over: the last checkpoint may take long).
    pub fn disarm_watchdog(&self) {
        if let Some(w) = &self.watchdog {
            w.disarm();
        }
    }

    /// Ends the whole job with `code` (a failure only this rank knows of, outside a step).
    pub fn abort(&self, code: i32) -> ! {
        match &self.engine {
            Some(e) => e.abort(code),
            None => std::process::exit(code),
        }
    }
}

/// A digest of `bytes` (CRC-32, for "do all ranks hold the same weights").
pub fn digest(bytes: &[u8]) -> u64 {
    u64::from(crc32fast::hash(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_group_is_the_identity() {
        let d = Dist::single();
        let mut buf = [1.0f32, -2.5];
        assert_eq!(d.sum_f32(&mut buf), 0.0);
        assert_eq!(buf, [1.0, -2.5]);
        assert_eq!(d.broadcast(vec![7, 8]), vec![7, 8]);
        assert_eq!(d.all_gather(&[3]), vec![vec![3]]);
        assert!(d.same_everywhere(42));
        let state = LoaderState { epoch: 2, batch: 5, consumed: 40, ..LoaderState::default() };
        assert_eq!(d.gather_loader_states(state).unwrap(), vec![state]);
    }

    /// Started as one of several processes by a launcher, a build without `mpi` refuses to run
    /// (exit 2) and says how to rebuild.
    #[cfg(not(feature = "mpi"))]
    #[test]
    fn a_launch_of_several_without_mpi_is_a_usage_error() {
        let launcher = launch::Launcher { name: "mpirun (Open MPI)", processes: 4 };
        let e = Dist::init_launched(launcher, std::time::Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CaeError::Usage(_)), "{e}");
        let text = e.to_string();
        assert!(text.contains("mpirun (Open MPI) as one of 4 processes") && text.contains("--features mpi"), "{text}");
    }

    #[test]
    fn digest_tells_bytes_apart() {
        assert_ne!(digest(b"weights a"), digest(b"weights b"));
        assert_eq!(digest(b"123456789"), 0xcbf4_3926); // CRC-32's check value
    }
}
