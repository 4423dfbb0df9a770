//! `metrics.jsonl`, the per-step log of a run directory.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::CaeError;

/// Name of the per-step log in the run dir.
pub const STEP_LOG: &str = "metrics.jsonl";

/// One line of `metrics.jsonl` (one per optimizer step). `step` counts completed steps
/// (1-based); `lr` is the rate that step used, `lr(step - 1)`. Lines are written when the
/// step's values are read back from the device: every `log_every` steps, at checkpoints and at
/// the end (see [`crate::train`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub loss_main: f64,
    pub loss_align: f64,
    pub lr: f64,
    /// `null` in the file (NaN here) for a step skipped on loss-scale overflow.
    #[serde(deserialize_with = "null_as_nan")]
    pub grad_norm: f64,
    pub step_seconds: f64,
    pub data_wait_seconds: f64,
    pub images_per_second: f64,
    /// Blocking device -> host read-backs during this step ([`crate::readback`]).
    #[serde(default)]
    pub host_syncs: u64,
    /// Data-parallel runs: seconds rank 0 spent in the step's all-reduce (its wait for the
    /// slowest rank included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_seconds: Option<f64>,
}

fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Keeps the lines of the step log up to `step` (a resumed run rewrites what came after),
/// replacing the file atomically.
pub fn truncate_step_log(path: &Path, step: u64) -> Result<(), CaeError> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    // Atomically: a crash leaves the old log or the new one.
    let tmp = path.with_extension("jsonl.tmp");
    fs::write(&tmp, kept).map_err(CaeError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(CaeError::io(path))
}

/// Reads a step log (`metrics.jsonl`).
pub fn read_step_log(path: &Path) -> Result<Vec<StepLog>, CaeError> {
    let text = fs::read_to_string(path).map_err(CaeError::io(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| CaeError::Data(format!("{}: {e}", path.display()))))
        .collect()
}
