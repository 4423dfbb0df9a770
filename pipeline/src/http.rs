//! Streaming HTTP(S) shard reads on tokio.
//!
//! A tokio task streams the response body in chunks into a bounded channel; the shard reader
//! consumes it through [`ChannelReader`] (a plain `Read`), so a shard is parsed while it
//! downloads and never held whole. A broken connection is retried with exponential backoff,
//! continuing from the byte already received (`Range: bytes=N-`; when the server ignores ranges
//! the first N bytes of the new response are skipped). After `retries` failures in a row the
//! reader returns an error: the loader counts the shard as failed and goes on.

use std::io::{self, Read};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::metrics as m;

/// HTTP behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Failed reads retried per shard before it is skipped.
    pub retries: u32,
    /// First backoff; doubled after each failure.
    pub backoff_ms: u64,
    pub connect_timeout_s: u64,
    /// A read that delivers nothing for this long fails (and is retried).
    pub read_timeout_s: u64,
    /// Chunks buffered per shard download (bounds memory: ~ chunk size × this).
    pub queue_chunks: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { retries: 3, backoff_ms: 200, connect_timeout_s: 10, read_timeout_s: 30, queue_chunks: 64 }
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
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("cae-io").enable_all().build()?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_s))
            .read_timeout(Duration::from_secs(cfg.read_timeout_s))
            .build()
            .map_err(io::Error::other)?;
        Ok(Self { rt, client, cfg: cfg.clone() })
    }

    /// Starts streaming `url`; read the bytes from the returned reader.
    pub fn open(&self, url: &str) -> ChannelReader {
        let (tx, rx) = async_channel::bounded(self.cfg.queue_chunks.max(1));
        self.rt.spawn(stream(self.client.clone(), url.to_string(), tx, self.cfg.clone()));
        ChannelReader { rx, cur: Bytes::new(), done: false }
    }
}

async fn stream(client: reqwest::Client, url: String, tx: async_channel::Sender<io::Result<Bytes>>, cfg: HttpConfig) {
    let mut offset = 0u64;
    let mut failures = 0u32;
    loop {
        match fetch_from(&client, &url, &mut offset, &tx).await {
            Ok(()) => return,
            Err(Fatal(e)) => {
                let _ = tx.send(Err(io::Error::other(crate::redact::text(&format!("{url}: {e}"))))).await;
                return;
            }
            Err(Retry(e, progressed)) => {
                if progressed {
                    failures = 0;
                }
                failures += 1;
                ::metrics::counter!(m::HTTP_RETRIES).increment(1);
                if failures > cfg.retries {
                    let msg = format!(
                        "{}: {e} (gave up after {} retries, {offset} bytes read)",
                        crate::redact::url(&url),
                        cfg.retries
                    );
                    let _ = tx.send(Err(io::Error::other(msg))).await;
                    return;
                }
                let wait = cfg.backoff_ms.saturating_mul(1 << (failures - 1).min(10));
                tracing::warn!(
                    "{}: {e}; retry {failures}/{} from byte {offset} in {wait} ms",
                    crate::redact::url(&url),
                    cfg.retries
                );
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }
}

/// A failure worth retrying (with whether any bytes arrived first), or one that is final.
enum FetchError {
    Retry(String, bool),
    Fatal(String),
}
use FetchError::{Fatal, Retry};

async fn fetch_from(
    client: &reqwest::Client,
    url: &str,
    offset: &mut u64,
    tx: &async_channel::Sender<io::Result<Bytes>>,
) -> Result<(), FetchError> {
    let mut req = client.get(url);
    if *offset > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
    }
    let mut resp = req.send().await.map_err(|e| Retry(e.to_string(), false))?;
    let status = resp.status();
    if status.is_client_error() {
        return Err(Fatal(format!("HTTP {status}")));
    }
    if !status.is_success() {
        return Err(Retry(format!("HTTP {status}"), false));
    }
    // The server ignored the range: skip what we already have.
    let mut skip = if *offset > 0 && status != reqwest::StatusCode::PARTIAL_CONTENT { *offset } else { 0 };
    let mut progressed = false;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Retry(e.to_string(), progressed)),
        };
        let chunk = if skip > 0 {
            let n = (skip as usize).min(chunk.len());
            skip -= n as u64;
            chunk.slice(n..)
        } else {
            chunk
        };
        if chunk.is_empty() {
            continue;
        }
        *offset += chunk.len() as u64;
        progressed = true;
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(()); // the reader went away (shard skipped or loader stopped)
        }
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
