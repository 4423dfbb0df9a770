//! Shared by the trainer's integration tests.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use cae_trainer::train::HANG_ENV;

/// The `trainer` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_trainer");

/// A small sharded sample set under `dir` (2 classes x 12 images, 12 per shard, a manifest).
pub fn shards(dir: &Path) -> PathBuf {
    shards_of(dir, 2, 12, 12)
}

/// `classes x per_class` generated images under `dir`, sharded `per_shard` to a shard (a manifest).
pub fn shards_of(dir: &Path, classes: usize, per_class: usize, per_shard: u64) -> PathBuf {
    let spec = cae_tools::fixtures::FixtureSpec { classes, per_class, seed: 1, odd_files: false, max_side: 120 };
    let fx = cae_tools::fixtures::generate(&dir.join("img"), &spec).unwrap();
    let out = dir.join("shards");
    let mut o = cae_sharder::BuildOptions::new(&fx.train_dir, &out);
    o.shard_max_samples = per_shard;
    o.workers = 1;
    cae_sharder::build(&o).unwrap();
    out
}

/// `trainer run` on `shards` into `out`: micro, pixels, batch 4, one worker, no metrics, no
/// progress bar, `steps` steps, then `extra`.
pub fn args(shards: &str, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--shards",
        shards,
        "--out",
        &out.to_string_lossy(),
        "--metrics-addr",
        "off",
        "--no-progress",
        "--steps",
        &steps.to_string(),
        "--set",
        "data.batch_size=4",
        "--set",
        "data.workers=1",
        "--set",
        "data.shuffle_buffer=8",
        "--set",
        "model.target=\"pixels\"",
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

pub fn spawn(args: &[String], envs: &[(&str, &str)]) -> Child {
    let mut c = Command::new(BIN);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).env_remove(HANG_ENV);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().expect("spawn trainer")
}

pub fn run(args: &[String]) -> Output {
    spawn(args, &[]).wait_with_output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Every file under `dir`, recursively, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The body of `GET /metrics` on 127.0.0.1:`port` (headers included).
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}
