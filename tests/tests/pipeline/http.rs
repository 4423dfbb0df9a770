//! Shards over HTTP from a server on the loopback interface: retries, `Retry-After`, fatal
//! statuses, the low-speed limit, range resumes checked against the ETag, IPv6 literals, a
//! remote manifest, and the bench's decode-only sample.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cae_pipeline::http::HttpConfig;
use cae_pipeline::source::{self, ShardSpec};
use cae_pipeline::{Loader, LoaderConfig, LoaderError, LoaderState};

use super::http_server::{Fault, Server, serve, serve_on};
use super::{Fingerprint, cfg, run_all, shard_names, shards};

/// Fast settings for tests: short backoff, a 0.3 s low-speed window.
/// Short backoffs; no low-speed limit (a loaded machine's stall would add requests the tests
/// count), except in the drip test ([`dripping`]).
fn fast(retries: u32) -> HttpConfig {
    HttpConfig { retries, backoff_ms: 10, backoff_max_s: 0.05, low_speed_bytes_per_s: 0, ..HttpConfig::default() }
}

/// [`fast`] with the default low-speed limit over a 0.3 s window.
fn dripping(retries: u32) -> HttpConfig {
    let d = HttpConfig::default();
    HttpConfig { low_speed_bytes_per_s: d.low_speed_bytes_per_s, low_speed_time_s: 0.3, ..fast(retries) }
}

/// The brace pattern of every shard of `dir` on `server`, and the same shards on disk.
fn remote_and_local(server: &Server, dir: &Path) -> (Vec<ShardSpec>, Vec<ShardSpec>) {
    let pattern = format!("train-{{000000..{:06}}}.tar", shard_names(dir).len() - 1);
    let remote = source::expand(&format!("http://{}/{pattern}", server.addr)).unwrap();
    let local = source::expand(dir.join(&pattern).to_str().unwrap()).unwrap();
    assert!(remote.iter().all(|s| s.is_http() && s.samples.is_none()));
    (remote, local)
}

/// Every batch of one epoch over HTTP; asserts no shard failed.
fn one_epoch(http: HttpConfig, specs: Vec<ShardSpec>) -> Vec<Fingerprint> {
    let mut c = LoaderConfig { epochs: Some(1), max_failed_shards: Some(0), ..cfg(2) };
    c.http = http;
    run_all(c, specs, LoaderState::default()).into_iter().map(|(f, _)| f).collect()
}

fn local_epoch(local: Vec<ShardSpec>) -> Vec<Fingerprint> {
    let out = one_epoch(HttpConfig::default(), local);
    assert!(!out.is_empty());
    out
}

/// One epoch on one worker, no failed shard allowed.
fn strict(http: HttpConfig) -> LoaderConfig {
    LoaderConfig { epochs: Some(1), max_failed_shards: Some(0), http, ..cfg(1) }
}

/// The error a loader ends with (after any batches).
fn final_error(c: LoaderConfig, specs: Vec<ShardSpec>) -> (LoaderError, u64) {
    let loader = Loader::new(c, specs, LoaderState::default()).unwrap();
    while let Some(b) = loader.next_blocking() {
        if let Err(e) = b {
            return (e, loader.stats().shards_failed.load(Ordering::Relaxed));
        }
    }
    panic!("the run ended without an error");
}

#[test]
fn http_source_survives_a_server_dying_mid_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    // Every shard's first response dies part way through.
    let cut = Fault { cut: Some(3000), ..Fault::default() };
    let server = serve(dir.clone(), shard_names(&dir).into_iter().map(|n| (n, cut.clone())).collect());
    let (remote, local) = remote_and_local(&server, &dir);
    assert_eq!(one_epoch(fast(3), remote), local_epoch(local), "HTTP with retries = local files");
    let log = server.requests.lock().unwrap().clone();
    let resumed: Vec<_> = log.iter().filter(|r| r.range_start == 3000).collect();
    assert_eq!(resumed.len(), shard_names(&dir).len(), "each shard resumes from the byte reached: {log:?}");
    assert!(resumed.iter().all(|r| r.if_range.as_deref() == Some("\"v1\"")), "If-Range carries the ETag");
}

/// A server that ignores `Range` and answers 200 with the same object: the bytes already read
/// are skipped, not read twice.
#[test]
fn a_200_to_a_range_request_skips_what_was_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let f = Fault { cut: Some(2500), ignore_range: true, ..Fault::default() };
    let server = serve(dir.clone(), shard_names(&dir).into_iter().map(|n| (n, f.clone())).collect());
    let (remote, local) = remote_and_local(&server, &dir);
    assert_eq!(one_epoch(fast(3), remote), local_epoch(local));
    assert!(server.requests.lock().unwrap().iter().any(|r| r.range_start == 2500));
}

/// 429 (Retry-After in seconds), 503 (Retry-After as an HTTP-date) and 408 are retried; the
/// server's wait is honoured although the configured backoff is 10 ms; no shard is lost.
#[test]
fn throttled_and_unavailable_responses_are_retried_honouring_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let names = shard_names(&dir);
    let faults = HashMap::from([
        (names[0].clone(), Fault { status: Some((429, 1, Some("1".into()))), ..Fault::default() }),
        (names[1].clone(), Fault { status: Some((503, 2, Some("date+2".into()))), ..Fault::default() }),
        (names[2].clone(), Fault { status: Some((408, 3, None)), ..Fault::default() }),
    ]);
    let server = serve(dir.clone(), faults);
    let (remote, local) = remote_and_local(&server, &dir);
    assert_eq!(one_epoch(fast(3), remote), local_epoch(local), "no shard lost");
    let gap = |name: &str, i: usize| {
        let r = server.requests_for(name);
        r[i + 1].at - r[i].at
    };
    assert_eq!(server.requests_for(&names[0]).len(), 2);
    assert!(gap(&names[0], 0) >= Duration::from_millis(950), "Retry-After: 1 -> {:?}", gap(&names[0], 0));
    assert_eq!(server.requests_for(&names[1]).len(), 3);
    // The date has one-second resolution: the first wait is between 1 and 2 s.
    assert!(gap(&names[1], 0) >= Duration::from_millis(900), "HTTP-date -> {:?}", gap(&names[1], 0));
    assert_eq!(server.requests_for(&names[2]).len(), 4, "408 three times, then the body");
}

#[test]
fn a_404_fails_that_shard_at_once_naming_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let names = shard_names(&dir);
    let server = serve(
        dir.clone(),
        HashMap::from([(names[2].clone(), Fault { status: Some((404, 99, None)), ..Fault::default() })]),
    );
    let (remote, _) = remote_and_local(&server, &dir);
    let (e, failed) = final_error(strict(fast(5)), remote);
    let url = format!("http://{}/{}", server.addr, names[2]);
    match &e {
        LoaderError::ShardsFailed { failed, last, .. } => {
            assert_eq!(failed, std::slice::from_ref(&url));
            assert!(last.contains("404") && last.contains(&url), "{last}");
        }
        other => panic!("expected ShardsFailed, got {other}"),
    }
    assert_eq!(failed, 1);
    assert_eq!(server.requests_for(&names[2]).len(), 1, "a 404 is not retried");
}

/// A 503 series: the shard fails after exactly `retries + 1` tries, is counted, and the run
/// goes on within `max_failed_shards`.
#[test]
fn a_dead_http_shard_fails_after_the_configured_tries_and_is_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let names = shard_names(&dir);
    let dead = Fault { status: Some((503, usize::MAX, None)), ..Fault::default() };
    let server = serve(dir.clone(), HashMap::from([(names[1].clone(), dead)]));
    let (remote, _) = remote_and_local(&server, &dir);
    let loader = Loader::new(
        LoaderConfig { max_failed_shards: Some(1), ..strict(fast(3)) },
        remote.clone(),
        LoaderState::default(),
    )
    .unwrap();
    let mut keys = Vec::new();
    while let Some(b) = loader.next_blocking() {
        keys.extend(b.unwrap().keys.clone());
    }
    assert!(!keys.is_empty(), "the other shards still deliver");
    assert_eq!(loader.stats().shards_failed.load(Ordering::Relaxed), 1);
    assert_eq!(server.requests_for(&names[1]).len(), 4, "one try plus three retries");
    // With no failure allowed, the run stops saying why.
    let (e, _) = final_error(strict(fast(3)), remote);
    assert!(e.to_string().contains("503") && e.to_string().contains("failed 4 tries"), "{e}");
}

/// A server that sends a byte every 20 ms (50 B/s) is dropped after the 0.3 s low-speed window
/// and the read resumes with a range request: no shard lost, and much faster than the drip.
#[test]
fn a_dripping_server_is_reconnected_and_loses_no_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let names = shard_names(&dir);
    let drip = Fault { drip_ms: Some(20), ..Fault::default() };
    let server = serve(dir.clone(), HashMap::from([(names[0].clone(), drip.clone()), (names[3].clone(), drip)]));
    let (remote, local) = remote_and_local(&server, &dir);
    let t = Instant::now();
    assert_eq!(one_epoch(dripping(3), remote), local_epoch(local));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    for n in [&names[0], &names[3]] {
        let r = server.requests_for(n);
        assert_eq!(r.len(), 2, "{n}: {r:?}");
        assert!(r[1].range_start > 0 && r[1].range_start < 100, "{n}: resumed from the dripped byte: {r:?}");
    }
}

/// The object changes between a cut and the resume: `If-Range` gets the new object (200 with
/// ETag v2), which is detected and fails the shard instead of splicing two versions.
#[test]
fn a_resume_onto_a_changed_object_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let names = shard_names(&dir);
    let changed = Fault { cut: Some(3000), change_etag: true, ..Fault::default() };
    let server = serve(dir.clone(), HashMap::from([(names[2].clone(), changed)]));
    let (remote, _) = remote_and_local(&server, &dir);
    let (e, failed) = final_error(strict(fast(3)), remote);
    assert!(e.to_string().contains("ETag \"v1\" -> \"v2\""), "{e}");
    assert_eq!(failed, 1);
    assert_eq!(server.requests_for(&names[2]).len(), 2, "detected on the first resume, not retried");
}

#[test]
fn ipv6_loopback_urls_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let Some(server) = serve_on("[::1]:0", dir.clone(), HashMap::new()) else {
        eprintln!("no IPv6 loopback on this machine; skipped");
        return;
    };
    assert!(server.addr.is_ipv6());
    let (remote, local) = remote_and_local(&server, &dir);
    assert_eq!(remote.len(), shard_names(&dir).len(), "the `::` of [::1] does not split the source");
    assert!(remote[0].url.raw().starts_with(&format!("http://[::1]:{}/", server.addr.port())));
    assert_eq!(one_epoch(fast(3), remote), local_epoch(local));
}

/// `manifest.json` over HTTP gives counts, so several ranks can read remote shards, and they
/// read exactly what they read from the same directory on disk.
#[test]
fn a_remote_manifest_allows_multi_rank_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let server = serve(dir.clone(), HashMap::new());
    let local = source::expand(dir.to_str().unwrap()).unwrap();
    for src in [format!("http://{}/manifest.json", server.addr), format!("http://{}/", server.addr)] {
        let remote = source::expand_with(&src, &fast(3)).unwrap();
        assert_eq!(remote.len(), local.len());
        for (r, l) in remote.iter().zip(&local) {
            assert_eq!(r.url, format!("http://{}/{}", server.addr, l.name()));
            assert_eq!(r.samples, l.samples);
        }
        for rank in 0..2 {
            let c = |specs| {
                let c = LoaderConfig { rank, world_size: 2, epochs: Some(1), ..cfg(1) };
                run_all(c, specs, LoaderState::default())
            };
            let (over_http, from_disk) = (c(remote.clone()), c(local.clone()));
            assert!(!from_disk.is_empty());
            assert_eq!(over_http, from_disk, "rank {rank} from {src}");
        }
    }
    let e = source::expand_with(&format!("http://{}/missing/manifest.json", server.addr), &fast(0)).unwrap_err();
    assert!(e.to_string().contains("404") && e.to_string().contains("missing/manifest.json"), "{e}");
}

/// `pipeline bench`'s decode-only baseline on remote shards: the images it fetches are those of
/// the same shards on disk.
#[test]
fn bench_decode_only_sample_reads_remote_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shards(tmp.path());
    let server = serve(dir.clone(), HashMap::new());
    let (remote, local) = remote_and_local(&server, &dir);
    let got = cae_pipeline::bench::sample_images(&remote, &fast(3), 20).unwrap();
    assert_eq!(got.len(), 20);
    assert_eq!(got, cae_pipeline::bench::sample_images(&local, &fast(3), 20).unwrap());
    let (rate, n) = cae_pipeline::bench::decode_only_rate(&got);
    assert!(n > 0 && rate > 0.0);
}
