//! Device -> host read-backs, all through one counting function.
//!
//! On an asynchronous device (CUDA, wgpu) reading a value blocks the host until the device has
//! caught up with everything queued before it: the step thread stops launching kernels and the
//! device idles while the next ones are queued. The training loop therefore reads its scalars
//! lazily ([`crate::train`]) and every read goes through [`read_f64s`], which counts it:
//! Prometheus `cae_train_host_syncs_total` and `host_syncs` in each `metrics.jsonl` line.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::CaeError;
use crate::metrics as m;

/// Host syncs of this process so far (the Prometheus counter's value).
static SYNCS: AtomicU64 = AtomicU64::new(0);

/// Counts one blocking host-device synchronisation that does not go through [`read_f64s`]
/// (writing a checkpoint reads every weight).
pub fn count_sync() {
    SYNCS.fetch_add(1, Ordering::Relaxed);
    ::metrics::counter!(m::HOST_SYNCS).increment(1);
}

/// Host syncs counted so far in this process.
pub fn syncs() -> u64 {
    SYNCS.load(Ordering::Relaxed)
}

/// The values of `t` as f64: one blocking read, counted.
pub fn read_f64s<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f64>, CaeError> {
    count_sync();
    t.into_data().convert::<f64>().to_vec::<f64>().map_err(|e| CaeError::Data(format!("reading values back: {e:?}")))
}

/// The values of `t` as f32, appended to `out`: one blocking read, counted (a data-parallel
/// step's gradients, into its reused buffer).
pub fn read_f32s_into<B: Backend, const D: usize>(t: Tensor<B, D>, out: &mut Vec<f32>) -> Result<(), CaeError> {
    count_sync();
    let data = t.into_data().convert::<f32>();
    let values = data.as_slice::<f32>().map_err(|e| CaeError::Data(format!("reading values back: {e:?}")))?;
    out.extend_from_slice(values);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn every_read_is_counted() {
        let dev = Default::default();
        let before = syncs();
        let v = read_f64s(Tensor::<Flex, 1>::from_floats([1.5, -2.0], &dev)).unwrap();
        assert_eq!(v, vec![1.5, -2.0]);
        count_sync();
        // Other tests may read concurrently in the same process: at least our two.
        assert!(syncs() >= before + 2);
    }
}
