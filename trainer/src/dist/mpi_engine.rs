//! The MPI engine of [`super::Collective`] (cargo feature `mpi`): Open MPI or MPICH through the
//! `mpi` crate (rsmpi), on host buffers. MPI is initialised with `MPI_THREAD_MULTIPLE`: the
//! watchdog thread calls `MPI_Abort` while the step loop's thread may be inside a collective.
//! Errors keep MPI's default handler (`MPI_ERRORS_ARE_FATAL`): a dead peer ends the job and the
//! launcher names the rank.

use std::cell::RefCell;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::{Count, Threading};

use super::Collective;
use crate::CaeError;

/// Largest element count one MPI call moves (counts are C ints); bigger buffers go in chunks.
const CHUNK: usize = 1 << 30;

/// This process's place in the job.
pub struct Place {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
}

pub struct MpiEngine {
    /// Finalises MPI when dropped (after the run).
    _universe: Universe,
    world: SimpleCommunicator,
    /// The send side of the sum (rsmpi has no in-place all-reduce), reused across steps.
    scratch: RefCell<Vec<f32>>,
}

impl MpiEngine {
    pub fn init() -> Result<(Self, Place), CaeError> {
        let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| CaeError::Config("MPI was already initialised in this process".into()))?;
        if provided != Threading::Multiple {
            tracing::warn!(
                "this MPI provides thread level {provided:?}, not Multiple: the hung-rank watchdog may not be able \
                 to end the job"
            );
        }
        let world = universe.world();
        let node = world.split_shared(world.rank());
        let place = Place {
            rank: world.rank() as usize,
            world: world.size() as usize,
            local_rank: node.rank() as usize,
            local_world: node.size() as usize,
        };
        Ok((Self { _universe: universe, world, scratch: RefCell::new(Vec::new()) }, place))
    }
}

/// `MPI_Abort` on the world communicator, from any thread (the watchdog's).
pub fn abort_job(code: i32) -> ! {
    // SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE before the watchdog starts;
    // RSMPI_COMM_WORLD is MPI_COMM_WORLD.
    unsafe {
        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
    }
    std::process::exit(code)
}

impl Collective for MpiEngine {
    fn sum_f32(&self, buf: &mut [f32]) {
        let mut send = self.scratch.borrow_mut();
        send.clear();
        send.extend_from_slice(buf);
        for (s, r) in send.chunks(CHUNK).zip(buf.chunks_mut(CHUNK)) {
            self.world.all_reduce_into(s, r, SystemOperation::sum());
        }
    }

    fn max_u64(&self, buf: &mut [u64]) {
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::max());
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
    }

    fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let n = self.world.size() as usize;
        let mut lens = vec![0u64; n];
        self.world.all_gather_into(&(bytes.len() as u64), &mut lens[..]);
        // Small payloads only (loader states): one call, C-int counts.
        let counts: Vec<Count> = lens.iter().map(|&l| l as Count).collect();
        let displs: Vec<Count> = counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
        let mut all = vec![0u8; lens.iter().sum::<u64>() as usize];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(bytes, &mut part);
        }
        let mut out = Vec::with_capacity(n);
        let mut at = 0usize;
        for l in lens {
            out.push(all[at..at + l as usize].to_vec());
            at += l as usize;
        }
        out
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
