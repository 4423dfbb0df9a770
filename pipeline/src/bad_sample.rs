//! A sample that cannot be used: counted, logged with shard + key + reason, and skipped (the run
//! goes on). The loader and the eval reader report them the same way.

use std::sync::Arc;

use crate::metrics as m;

/// Error kind of a sample whose processing panicked (a bug, in our code or a dependency's).
pub const PANIC_KIND: &str = "panic";

/// One bad sample.
#[derive(Debug)]
pub struct BadSample {
    /// Error kind for `cae_pipeline_errors_total` (`decode`, `too_large`, `missing_image`, ...).
    pub kind: &'static str,
    /// The shard's shown name ([`ShardSpec::name`](crate::source::ShardSpec::name): secrets
    /// redacted when the spec was made).
    pub shard: Arc<str>,
    pub key: String,
    pub reason: String,
}

impl BadSample {
    pub fn new(kind: &'static str, shard: Arc<str>, key: &str, reason: String) -> Self {
        Self { kind, shard, key: key.to_string(), reason }
    }

    /// A panic while processing `key` of `shard` (the sample is skipped, the run goes on).
    pub fn panicked(shard: Arc<str>, key: String, what: &str) -> Self {
        let reason = format!("processing panicked (a bug, please report it with this sample): {what}");
        Self { kind: PANIC_KIND, shard, key, reason }
    }

    /// Counts it in `cae_pipeline_errors_total{kind}` and logs it.
    pub fn report(&self) {
        ::metrics::counter!(m::ERRORS, "kind" => self.kind).increment(1);
        // The name is already redacted; redacting again costs nothing on this rare path and keeps
        // a name made by hand safe too.
        tracing::warn!("skipping sample {} of shard {}: {}", self.key, crate::redact::url(&self.shard), self.reason);
    }
}
