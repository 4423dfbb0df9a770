//! What to do after a failed request: which statuses are worth another try, how long to wait
//! (exponential backoff with jitter, or the server's `Retry-After`).

use std::hash::{Hash, Hasher};
use std::time::{Duration, SystemTime};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reqwest::StatusCode;

use super::HttpConfig;

/// How a response status is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// 2xx: read the body.
    Read,
    /// 408 Request Timeout, 429 Too Many Requests, 5xx: try again later.
    Retry,
    /// Any other status (404, 403, 416, ...): the shard fails now.
    Fatal,
}

pub(super) fn classify(status: StatusCode) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Read,
        408 | 429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Fatal,
    }
}

/// The wait a `Retry-After` value asks for: delta-seconds (`120`) or an HTTP-date (`Fri, 31 Dec
/// 1999 23:59:59 GMT`, a date in the past meaning now). `None` when it is neither.
pub(super) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait before try number `failures + 1` of `url` (`failures` >= 1).
///
/// Without a `Retry-After`: `backoff_ms x 2^(failures - 1)`, capped at `backoff_max_s`, of which a
/// random half is waited ("equal jitter": between 50 % and 100 % of the step), so that readers that
/// failed together do not come back together. The jitter is a fixed function of the URL and the
/// try number (no clock, no shared RNG): it decorrelates shards, and never touches sample order.
/// With a `Retry-After`: that wait (capped at `retry_after_max_s`), but never less than the
/// backoff step would give.
pub(super) fn delay(cfg: &HttpConfig, url: &str, failures: u32, retry_after: Option<Duration>) -> Duration {
    let step_ms = cfg.backoff_ms.saturating_mul(1u64 << failures.saturating_sub(1).min(32)) as f64;
    let cap_ms = cfg.backoff_max_s * 1e3;
    let step = step_ms.min(cap_ms);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (url, failures).hash(&mut h);
    let u: f64 = ChaCha8Rng::seed_from_u64(h.finish()).random_range(0.0..1.0);
    let backoff = Duration::from_secs_f64(step * (0.5 + 0.5 * u) / 1e3);
    match retry_after {
        Some(asked) => asked.min(Duration::from_secs_f64(cfg.retry_after_max_s)).max(backoff),
        None => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        for (code, v) in [
            (200, Verdict::Read),
            (206, Verdict::Read),
            (408, Verdict::Retry),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
            (599, Verdict::Retry),
            (400, Verdict::Fatal),
            (403, Verdict::Fatal),
            (404, Verdict::Fatal),
            (416, Verdict::Fatal),
            (304, Verdict::Fatal),
        ] {
            assert_eq!(classify(StatusCode::from_u16(code).unwrap()), v, "{code}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO), "past = now");
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let cfg = HttpConfig { backoff_ms: 100, backoff_max_s: 1.0, retry_after_max_s: 5.0, ..HttpConfig::default() };
        for failures in 1..=12u32 {
            let step = (100.0 * 2f64.powi(failures as i32 - 1)).min(1000.0);
            let d = delay(&cfg, "http://h/a.tar", failures, None).as_secs_f64() * 1e3;
            assert!(d >= step * 0.5 - 1e-6 && d <= step + 1e-6, "try {failures}: {d} ms for a {step} ms step");
            assert_eq!(delay(&cfg, "http://h/a.tar", failures, None).as_secs_f64() * 1e3, d, "deterministic");
        }
        // Jitter differs between URLs (decorrelated readers).
        let waits: std::collections::HashSet<u128> =
            (0..8).map(|i| delay(&cfg, &format!("http://h/{i}.tar"), 3, None).as_micros()).collect();
        assert!(waits.len() > 4, "{waits:?}");
        // Retry-After wins over a shorter backoff, up to its own cap.
        assert_eq!(delay(&cfg, "u", 1, Some(Duration::from_secs(3))), Duration::from_secs(3));
        assert_eq!(delay(&cfg, "u", 1, Some(Duration::from_secs(3600))), Duration::from_secs(5));
        assert!(delay(&cfg, "u", 10, Some(Duration::ZERO)) >= Duration::from_millis(500));
    }
}
