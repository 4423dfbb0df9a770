//! Prometheus metrics of a training run (through the `metrics` facade; [`install`] serves them
//! together with the pipeline's `cae_pipeline_*` series). Names carry the `cae_` prefix;
//! counters end in `_total`, timings in `_seconds`. Every series has help text, which
//! `promtool check metrics` requires.

use std::net::SocketAddr;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Optimizer steps completed.
pub const STEPS: &str = "cae_train_steps_total";
/// Images consumed by completed steps.
pub const IMAGES: &str = "cae_train_images_total";
/// Total loss of the last step (`loss_main + loss_align`).
pub const LOSS: &str = "cae_train_loss";
/// Main loss of the last step (cross-entropy over tokens, or pixel MSE).
pub const LOSS_MAIN: &str = "cae_train_loss_main";
/// Alignment loss of the last step (2·MSE to the teacher).
pub const LOSS_ALIGN: &str = "cae_train_loss_align";
/// Learning rate of the last step.
pub const LR: &str = "cae_train_lr";
/// Global gradient L2 norm of the last step, before clipping.
pub const GRAD_NORM: &str = "cae_train_grad_norm";
/// Wall time per optimizer step (data wait included).
pub const STEP_SECONDS: &str = "cae_train_step_seconds";
/// Time per step the training loop was blocked waiting for the data pipeline.
pub const DATA_WAIT_SECONDS: &str = "cae_train_data_wait_seconds";
/// The part of the data wait during which the device feeder was preparing the batch (upload,
/// normalisation and targets: the DALL-E tokenizer's forward, mostly), not waiting on the
/// pipeline: a large share means more `data.workers` will not help.
pub const TOKENIZER_WAIT_SECONDS: &str = "cae_train_tokenizer_wait_seconds";
/// Training throughput over the last step.
pub const IMAGES_PER_SECOND: &str = "cae_train_images_per_second";
/// Current data epoch.
pub const EPOCH: &str = "cae_train_epoch";
/// Checkpoints written.
pub const CHECKPOINTS: &str = "cae_train_checkpoints_total";
/// Time to write one checkpoint.
pub const CHECKPOINT_SECONDS: &str = "cae_train_checkpoint_seconds";
/// Optimizer steps skipped because the scaled loss or gradients overflowed (f16 loss scaling).
pub const SKIPPED_STEPS: &str = "cae_train_skipped_steps_total";
/// Current loss scale (1 without loss scaling).
pub const LOSS_SCALE: &str = "cae_train_loss_scale";
/// Blocking device -> host read-backs (crate::readback): at most one per optimizer step.
pub const HOST_SYNCS: &str = "cae_train_host_syncs_total";
/// Data-parallel runs: seconds per step this rank spent in the gradient all-reduce (waiting
/// for the slowest rank included). Every rank serves its own, labelled `rank`.
pub const ALLREDUCE_SECONDS: &str = "cae_train_allreduce_seconds";

/// Every series the trainer exports (the pipeline's are in `cae_pipeline::metrics`).
pub const ALL: &[&str] = &[
    STEPS,
    IMAGES,
    LOSS,
    LOSS_MAIN,
    LOSS_ALIGN,
    LR,
    GRAD_NORM,
    STEP_SECONDS,
    DATA_WAIT_SECONDS,
    TOKENIZER_WAIT_SECONDS,
    IMAGES_PER_SECOND,
    EPOCH,
    CHECKPOINTS,
    CHECKPOINT_SECONDS,
    SKIPPED_STEPS,
    LOSS_SCALE,
    HOST_SYNCS,
    ALLREDUCE_SECONDS,
];

/// Registers help texts (call after the recorder is installed).
pub fn describe() {
    describe_counter!(STEPS, Unit::Count, "Optimizer steps completed");
    describe_counter!(IMAGES, Unit::Count, "Images consumed by completed optimizer steps");
    describe_gauge!(LOSS, "Total CAE loss (loss_main + loss_align) of the last step");
    describe_gauge!(LOSS_MAIN, "Main CAE loss of the last step (token cross-entropy or pixel MSE)");
    describe_gauge!(LOSS_ALIGN, "Alignment loss of the last step (2 x MSE to the teacher)");
    describe_gauge!(LR, "Learning rate of the last step");
    describe_gauge!(GRAD_NORM, "Global gradient L2 norm of the last step, before clipping");
    describe_histogram!(STEP_SECONDS, Unit::Seconds, "Wall time per optimizer step, data wait included");
    describe_histogram!(DATA_WAIT_SECONDS, Unit::Seconds, "Time per step the training loop waited for data");
    describe_histogram!(
        TOKENIZER_WAIT_SECONDS,
        Unit::Seconds,
        "Part of the data wait per step spent preparing the batch's targets (tokenizer), not waiting on the pipeline"
    );
    describe_gauge!(IMAGES_PER_SECOND, "Training images per second over the last step");
    describe_gauge!(EPOCH, "Current data epoch");
    describe_counter!(CHECKPOINTS, Unit::Count, "Checkpoints written");
    describe_histogram!(CHECKPOINT_SECONDS, Unit::Seconds, "Time to write one checkpoint");
    describe_counter!(SKIPPED_STEPS, Unit::Count, "Steps skipped on loss-scale overflow (no update)");
    describe_gauge!(LOSS_SCALE, "Dynamic loss scale (1 without loss scaling)");
    describe_counter!(HOST_SYNCS, Unit::Count, "Blocking device-to-host read-backs of the training loop");
    describe_histogram!(
        ALLREDUCE_SECONDS,
        Unit::Seconds,
        "Data parallel: time per step in the gradient all-reduce, waiting for the slowest rank included"
    );
    cae_pipeline::metrics::describe();
}

/// Registers every series at its starting value, so a scrape before the first step lists them
/// all (a dashboard must not wait for a checkpoint or a skipped step to see a series): counters
/// at 0, histograms empty, the loss gauges NaN until a step's values are read (no value yet),
/// the loss scale at 1.
pub fn register() {
    for name in [STEPS, IMAGES, CHECKPOINTS, SKIPPED_STEPS, HOST_SYNCS] {
        metrics::counter!(name).increment(0);
    }
    for name in [STEP_SECONDS, DATA_WAIT_SECONDS, TOKENIZER_WAIT_SECONDS, CHECKPOINT_SECONDS, ALLREDUCE_SECONDS] {
        let _ = metrics::histogram!(name);
    }
    for name in [LOSS, LOSS_MAIN, LOSS_ALIGN, GRAD_NORM] {
        metrics::gauge!(name).set(f64::NAN);
    }
    for name in [LR, IMAGES_PER_SECOND, EPOCH] {
        metrics::gauge!(name).set(0.0);
    }
    metrics::gauge!(LOSS_SCALE).set(1.0);
    cae_pipeline::metrics::register();
}

/// Installs the Prometheus recorder and its HTTP listener on `addr` (a data-parallel rank's
/// series carry the label `rank`), then registers the help texts and every series. Fails when the address cannot be bound or a recorder is already
/// installed.
pub fn install(addr: SocketAddr, rank: Option<usize>) -> Result<(), String> {
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr);
    if let Some(r) = rank {
        builder = builder.add_global_label("rank", r.to_string());
    }
    builder.install().map_err(|e| format!("metrics endpoint on {addr}: {e}"))?;
    describe();
    register();
    Ok(())
}
