//! Streaming HTTP(S) shard reads on tokio.
//!
//! A tokio task streams the response body in chunks into a bounded channel; the shard reader
//! consumes it through [`ChannelReader`] (a plain `Read`), so a shard is parsed while it
//! downloads and never held whole.
//!
//! Failures: a broken connection, a timeout, a download slower than `low_speed_bytes_per_s` over
//! `low_speed_time_s` (curl's low-speed limit: a server dripping a byte every 20 s cannot hold a
//! reader for ever), and the statuses 408, 429 and 5xx are retried, after an exponential backoff
//! with jitter or the server's `Retry-After` ([`retry`]). Every other status (404, 403, ...) fails
//! the shard at once, with the status in the error. A retry continues from the byte reached
//! (`Range` + `If-Range`), checked so that two versions of an object are never spliced
//! ([`resume`]). After `retries` failed tries in a row the reader returns an error: the loader
//! counts the shard as failed and goes on (or stops, past `max_failed_shards`).
//!
//! TLS roots: `SSL_CERT_FILE`/`SSL_CERT_DIR`, else the system store plus the built-in roots
//! ([`roots`], rustls-native-certs); a certificate they do not trust fails the shard at once.

use std::io::{self, Read};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::metrics as m;

mod resume;
mod retry;
mod roots;

use resume::Resume;
use retry::Verdict;

/// HTTP behaviour (`data.http.*` in the trainer's run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Failed tries in a row retried before the shard fails (tries = retries + 1). A try that
    /// delivered a low-speed window's worth of bytes resets the count.
    pub retries: u32,
    /// First backoff step; doubled after each failure up to `backoff_max_s`. A random 50-100 % of
    /// the step is waited (jitter).
    pub backoff_ms: u64,
    /// Cap of the backoff step, seconds.
    pub backoff_max_s: f64,
    /// Longest `Retry-After` honoured (a longer one is waited this long), seconds.
    pub retry_after_max_s: f64,
    pub connect_timeout_s: u64,
    /// A read that delivers nothing for this long fails (and is retried).
    pub read_timeout_s: u64,
    /// Low-speed limit: a download that receives fewer than `low_speed_bytes_per_s x
    /// low_speed_time_s` bytes in any `low_speed_time_s` window (waiting for response headers
    /// included) is dropped and resumed with a range request. 0 turns the limit off.
    pub low_speed_bytes_per_s: u64,
    pub low_speed_time_s: f64,
    /// Chunks buffered per shard download (bounds memory: ~ chunk size × this).
    pub queue_chunks: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            retries: 8,
            backoff_ms: 500,
            backoff_max_s: 30.0,
            retry_after_max_s: 120.0,
            connect_timeout_s: 10,
            read_timeout_s: 30,
            low_speed_bytes_per_s: 1024,
            low_speed_time_s: 60.0,
            queue_chunks: 64,
        }
    }
}

impl HttpConfig {
    /// Refuses values that would never time out, loop for ever or overflow a `Duration`.
    pub fn validate(&self) -> Result<(), String> {
        if self.connect_timeout_s == 0 || self.read_timeout_s == 0 {
            return Err("data.http.connect_timeout_s and read_timeout_s must be >= 1 (0 is no timeout)".into());
        }
        for (key, v) in [
            ("backoff_max_s", self.backoff_max_s),
            ("retry_after_max_s", self.retry_after_max_s),
            ("low_speed_time_s", self.low_speed_time_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                return Err(format!("data.http.{key} = {v} must be a number of seconds in (0, 86400]"));
            }
        }
        if self.retries > 1000 || self.queue_chunks == 0 || self.queue_chunks > 1 << 20 {
            return Err("data.http.retries must be <= 1000 and queue_chunks in 1..=1048576".into());
        }
        Ok(())
    }

    /// Bytes a try must deliver to reset the count of failures in a row.
    fn progress_bytes(&self) -> u64 {
        ((self.low_speed_bytes_per_s as f64 * self.low_speed_time_s) as u64).max(1)
    }
}

/// Starts downloads on a tokio runtime it owns (two I/O threads).
pub struct HttpFetcher {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    cfg: HttpConfig,
}

impl HttpFetcher {
    pub fn new(cfg: &HttpConfig) -> io::Result<Self> {
        cfg.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("cae-io").enable_all().build()?;
        let roots = roots::load().map_err(io::Error::other)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_s))
            .read_timeout(Duration::from_secs(cfg.read_timeout_s))
            .tls_built_in_root_certs(roots.built_in);
        for cert in roots.certs {
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(io::Error::other)?;
        Ok(Self { rt, client, cfg: cfg.clone() })
    }

    /// Starts streaming `url`; read the bytes from the returned reader.
    pub fn open(&self, url: &str) -> ChannelReader {
        let (tx, rx) = async_channel::bounded(self.cfg.queue_chunks.max(1));
        self.rt.spawn(stream(self.client.clone(), url.to_string(), tx, self.cfg.clone()));
        ChannelReader { rx, cur: Bytes::new(), done: false }
    }

    /// The whole body of `url` (a manifest), refused when longer than `max` bytes.
    pub fn get(&self, url: &str, max: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open(url).take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(io::Error::other(format!("{}: longer than {max} bytes", crate::redact::url(url))));
        }
        Ok(out)
    }
}

/// One download across its tries.
struct Download {
    url: String,
    /// Bytes delivered to the reader so far.
    offset: u64,
    resume: Resume,
}

/// A failure worth retrying (with a label for the metric and the server's `Retry-After`), or one
/// that fails the shard now.
enum FetchError {
    Retry { kind: &'static str, msg: String, retry_after: Option<Duration> },
    Fatal(String),
}
use FetchError::{Fatal, Retry};

/// A reqwest error with its causes ("error sending request: ... Connection refused"), without
/// the URL (the caller names it once).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    msg
}

fn network(e: reqwest::Error) -> FetchError {
    if untrusted_certificate(&e) {
        // Retrying cannot fix it: fail the shard now, with the way out.
        return Fatal(format!(
            "{} (a private CA? point SSL_CERT_FILE or SSL_CERT_DIR at its certificate)",
            describe(e)
        ));
    }
    Retry { kind: "network", msg: describe(e), retry_after: None }
}

/// Whether the TLS handshake failed on the server's certificate: a rustls `InvalidCertificate`
/// somewhere in the error's causes. An `io::Error` hides its inner error from `source()` (and
/// the connector nests them), so each one's inner error is searched too.
fn untrusted_certificate(e: &reqwest::Error) -> bool {
    fn search(e: &(dyn std::error::Error + 'static), depth: usize) -> bool {
        if depth > 16 {
            return false;
        }
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        let inner = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref);
        inner.is_some_and(|i| search(i, depth + 1)) || e.source().is_some_and(|s| search(s, depth + 1))
    }
    search(e, 0)
}

async fn stream(client: reqwest::Client, url: String, tx: async_channel::Sender<io::Result<Bytes>>, cfg: HttpConfig) {
    let mut dl = Download { url, offset: 0, resume: Resume::default() };
    let mut failures = 0u32;
    let shown = crate::redact::url(&dl.url);
    loop {
        let before = dl.offset;
        let (kind, e, retry_after) = match fetch_from(&client, &mut dl, &tx, &cfg).await {
            Ok(()) => return,
            Err(Fatal(e)) => {
                let _ = tx.send(Err(io::Error::other(crate::redact::text(&format!("{shown}: {e}"))))).await;
                return;
            }
            Err(Retry { kind, msg, retry_after }) => (kind, crate::redact::text(&msg), retry_after),
        };
        if dl.offset - before >= cfg.progress_bytes() {
            failures = 0;
        }
        failures += 1;
        ::metrics::counter!(m::HTTP_RETRIES, "kind" => kind).increment(1);
        if failures > cfg.retries || tx.is_closed() {
            let msg = format!("{shown}: {e} (failed {failures} tries in a row, {} bytes read)", dl.offset);
            let _ = tx.send(Err(io::Error::other(msg))).await;
            return;
        }
        let wait = retry::delay(&cfg, &dl.url, failures, retry_after);
        tracing::warn!(
            "{shown}: {e}; retry {failures}/{} from byte {} in {:.1} s",
            cfg.retries,
            dl.offset,
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
        if tx.is_closed() {
            return; // the reader went away while we waited
        }
    }
}

/// One try: a request from `dl.offset`, its body streamed into `tx` until the end.
async fn fetch_from(
    client: &reqwest::Client,
    dl: &mut Download,
    tx: &async_channel::Sender<io::Result<Bytes>>,
    cfg: &HttpConfig,
) -> Result<(), FetchError> {
    let window = Duration::from_secs_f64(cfg.low_speed_time_s);
    let limited = cfg.low_speed_bytes_per_s > 0;
    let need = cfg.low_speed_bytes_per_s as f64 * cfg.low_speed_time_s;
    let mut req = client.get(&dl.url);
    for (name, value) in dl.resume.request_headers(dl.offset) {
        req = req.header(name, value);
    }
    let sent = req.send();
    let resp = if limited {
        tokio::time::timeout(window, sent).await.map_err(|_| low_speed(0, window, cfg))?
    } else {
        sent.await
    };
    let mut resp = resp.map_err(|e| if e.is_builder() || e.is_redirect() { Fatal(describe(e)) } else { network(e) })?;
    let status = resp.status();
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && dl.resume.complete_at(dl.offset) {
        return Ok(()); // the last try broke after the last byte
    }
    match retry::classify(status) {
        Verdict::Read => {}
        Verdict::Retry => {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
            return Err(Retry { kind: "status", msg: format!("HTTP {status}"), retry_after });
        }
        Verdict::Fatal => return Err(Fatal(format!("HTTP {status}"))),
    }
    let mut skip = dl.resume.accept(dl.offset, status, resp.headers()).map_err(|e| Fatal(e.to_string()))?;
    let (mut win_start, mut win_bytes) = (Instant::now(), 0u64);
    loop {
        let next = if limited {
            tokio::time::timeout_at(win_start + window, resp.chunk()).await.ok()
        } else {
            Some(resp.chunk().await)
        };
        if let Some(next) = next {
            let chunk = match next {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(()),
                Err(e) => return Err(network(e)),
            };
            win_bytes += chunk.len() as u64;
            let chunk = if skip > 0 {
                let n = (skip as usize).min(chunk.len());
                skip -= n as u64;
                chunk.slice(n..)
            } else {
                chunk
            };
            if !chunk.is_empty() {
                dl.offset += chunk.len() as u64;
                let blocked = Instant::now();
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(()); // the reader went away (shard skipped or loader stopped)
                }
                // Time spent waiting for the consumer is not the server's slowness.
                win_start += blocked.elapsed();
            }
        }
        if limited && Instant::now() >= win_start + window {
            if (win_bytes as f64) < need {
                return Err(low_speed(win_bytes, window, cfg));
            }
            (win_start, win_bytes) = (Instant::now(), 0);
        }
    }
}

fn low_speed(bytes: u64, window: Duration, cfg: &HttpConfig) -> FetchError {
    Retry {
        kind: "low_speed",
        msg: format!(
            "{bytes} bytes in {:.1} s, below the low-speed limit of {} B/s; reconnecting",
            window.as_secs_f64(),
            cfg.low_speed_bytes_per_s
        ),
        retry_after: None,
    }
}

/// `Read` over the chunks of a download.
pub struct ChannelReader {
    rx: async_channel::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv_blocking() {
                Ok(Ok(chunk)) => self.cur = chunk,
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}
