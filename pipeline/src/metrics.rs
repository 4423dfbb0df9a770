//! Metric names of the pipeline (through the `metrics` facade; whoever installs a recorder —
//! the trainer's Prometheus exporter — serves them). Counters end in `_total`, timings in
//! `_seconds`; label cardinality is bounded (`kind` has a fixed set of values).

/// Samples read from shards (good or bad).
pub const SAMPLES_READ: &str = "cae_pipeline_samples_read_total";
/// Samples turned into views + mask.
pub const SAMPLES_DONE: &str = "cae_pipeline_samples_total";
/// Shard bytes read.
pub const BYTES_READ: &str = "cae_pipeline_bytes_read_total";
/// Shards opened / failed.
pub const SHARDS_OPENED: &str = "cae_pipeline_shards_opened_total";
pub const SHARDS_FAILED: &str = "cae_pipeline_shards_failed_total";
/// Bad samples, label `kind`: decode, too_large, missing_image, missing_class, bad_class, format,
/// augment, mask, panic (a bug caught in a worker); shard-level tar errors count as `tar`.
pub const ERRORS: &str = "cae_pipeline_errors_total";
/// HTTP retries.
pub const HTTP_RETRIES: &str = "cae_pipeline_http_retries_total";
/// Shards read to reach a saved position on resume (bounded by the shuffle buffer with the
/// manifest's counts; a whole epoch's prefix when replayed).
pub const RESUME_SHARDS_READ: &str = "cae_pipeline_resume_shards_read_total";
/// Seconds the last resume took to reach its saved position.
pub const RESUME_SECONDS: &str = "cae_pipeline_resume_seconds";
/// Per-sample JPEG decode time.
pub const DECODE_SECONDS: &str = "cae_pipeline_decode_seconds";
/// Per-sample crop/resize/mask time.
pub const AUGMENT_SECONDS: &str = "cae_pipeline_augment_seconds";
/// Batches pushed into / popped from the prefetch queue (queue depth = pushed - popped).
pub const BATCHES_PUSHED: &str = "cae_pipeline_batches_pushed_total";
pub const BATCHES_POPPED: &str = "cae_pipeline_batches_popped_total";
/// Batches waiting in the prefetch queue.
pub const QUEUE_DEPTH: &str = "cae_pipeline_queue_depth";
/// Images per second over the last batch interval.
pub const IMAGES_PER_SECOND: &str = "cae_pipeline_images_per_second";

/// Every value of [`ERRORS`]' `kind` label.
pub const ERROR_KINDS: &[&str] = &[
    "decode",
    "too_large",
    "missing_image",
    "missing_class",
    "bad_class",
    "format",
    "augment",
    "mask",
    "panic",
    "tar",
];

/// Every value of [`HTTP_RETRIES`]' `kind` label.
pub const HTTP_RETRY_KINDS: &[&str] = &["network", "status", "low_speed"];

/// Every series of the pipeline.
pub const ALL: &[&str] = &[
    SAMPLES_READ,
    SAMPLES_DONE,
    BYTES_READ,
    SHARDS_OPENED,
    SHARDS_FAILED,
    ERRORS,
    HTTP_RETRIES,
    RESUME_SHARDS_READ,
    RESUME_SECONDS,
    DECODE_SECONDS,
    AUGMENT_SECONDS,
    BATCHES_PUSHED,
    BATCHES_POPPED,
    QUEUE_DEPTH,
    IMAGES_PER_SECOND,
];

/// Registers every series at its starting value (counters 0 — [`ERRORS`] for each kind —,
/// gauges 0, histograms empty), so a scrape lists each one from the start.
pub fn register() {
    use ::metrics::{counter, gauge, histogram};
    let counters = [SAMPLES_READ, SAMPLES_DONE, BYTES_READ, SHARDS_OPENED, SHARDS_FAILED, RESUME_SHARDS_READ];
    for name in counters.into_iter().chain([BATCHES_PUSHED, BATCHES_POPPED]) {
        counter!(name).increment(0);
    }
    for &kind in ERROR_KINDS {
        counter!(ERRORS, "kind" => kind).increment(0);
    }
    for &kind in HTTP_RETRY_KINDS {
        counter!(HTTP_RETRIES, "kind" => kind).increment(0);
    }
    for name in [RESUME_SECONDS, QUEUE_DEPTH, IMAGES_PER_SECOND] {
        gauge!(name).set(0.0);
    }
    for name in [DECODE_SECONDS, AUGMENT_SECONDS] {
        let _ = histogram!(name);
    }
}

/// Registers help texts (Prometheus requires them; `promtool check metrics` fails without).
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SAMPLES_READ, Unit::Count, "Samples read from shards, good or bad");
    describe_counter!(SAMPLES_DONE, Unit::Count, "Samples decoded and augmented into views and masks");
    describe_counter!(BYTES_READ, Unit::Bytes, "Shard bytes read");
    describe_counter!(SHARDS_OPENED, Unit::Count, "Shards opened");
    describe_counter!(SHARDS_FAILED, Unit::Count, "Shards that failed to open or broke while reading");
    describe_counter!(ERRORS, Unit::Count, "Bad samples skipped, by kind");
    describe_counter!(HTTP_RETRIES, Unit::Count, "HTTP shard reads retried");
    describe_counter!(RESUME_SHARDS_READ, Unit::Count, "Shards read to reach a saved position on resume");
    describe_gauge!(RESUME_SECONDS, Unit::Seconds, "Seconds the last resume took to reach its saved position");
    describe_histogram!(DECODE_SECONDS, Unit::Seconds, "JPEG decode time per sample");
    describe_histogram!(AUGMENT_SECONDS, Unit::Seconds, "Crop, resize and mask time per sample");
    describe_counter!(BATCHES_PUSHED, Unit::Count, "Batches pushed into the prefetch queue");
    describe_counter!(BATCHES_POPPED, Unit::Count, "Batches taken from the prefetch queue");
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Batches waiting in the prefetch queue");
    describe_gauge!(IMAGES_PER_SECOND, "Images per second delivered by the pipeline");
}
