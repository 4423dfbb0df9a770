//! Interrupted builds, end to end through the real `sharder` binary: signals mid-shard, `--resume`
//! (byte-identical result, refusals naming what changed, its summary), `verify` on an unfinished
//! build. The binary is built with the `test-hooks` feature (this crate's dev-dependency on
//! itself), so the hooks of `cae_sharder::build` pause or crash it at known points.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cae_sharder::build::{CRASH_ENV, JOURNAL_FILE, PAUSE_ENV};
use cae_tools::fixtures::{FixtureSpec, Fixtures, generate};

fn sharder() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sharder"))
}

/// 3 classes x 6 photos plus the odd files (3 of them rejected, 3 converted).
fn fixtures(dir: &Path) -> Fixtures {
    generate(dir, &FixtureSpec { classes: 3, per_class: 6, seed: 5, odd_files: true, max_side: 300 }).unwrap()
}

/// `sharder build` with 4 samples per shard and 2 workers, plus `extra`.
fn build_cmd(input: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = sharder();
    c.args(["build", "--shard-max-samples", "4", "--workers", "2", "--input"]).arg(input).arg("--output").arg(out);
    c.args(extra);
    c
}

fn verify_cmd(dir: &Path) -> Command {
    let mut c = sharder();
    c.arg("verify").arg(dir);
    c
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Every file of `dir` (hidden ones included) by name.
fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

/// An uninterrupted build of `input` into a fresh `out`.
fn reference(input: &Path, out: &Path) -> BTreeMap<String, Vec<u8>> {
    let o = run(build_cmd(input, out, &[]));
    assert!(o.status.success(), "{}", text(&o));
    dir_files(out)
}

/// A build killed (abort, as by `kill -9`) in the middle of the shard after `shards` complete ones.
fn crashed_build(input: &Path, out: &Path, shards: u64) {
    let mut c = build_cmd(input, out, &[]);
    c.env(CRASH_ENV, shards.to_string());
    let o = run(c);
    assert!(!o.status.success(), "the build must die (is the binary built with feature test-hooks?): {}", text(&o));
    assert!(out.join(JOURNAL_FILE).exists() && !out.join("manifest.json").exists());
}

/// Fixtures and a build of them (in `out`) killed after `shards` complete shards.
fn interrupted(shards: u64) -> (tempfile::TempDir, Fixtures, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"));
    let out = tmp.path().join("out");
    crashed_build(&fx.train_dir, &out, shards);
    (tmp, fx, out)
}

/// Stops a build paused mid-shard (hook [`PAUSE_ENV`]) with SIGINT or SIGTERM: it keeps the complete
/// shards, drops the one in progress, says to `--resume`, exits 128 + N; the resume then writes
/// exactly the files an uninterrupted build writes.
#[test]
fn sigint_and_sigterm_mid_shard_then_resume_equal_an_uninterrupted_build() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"));
    let want = reference(&fx.train_dir, &tmp.path().join("reference"));
    assert!(want.contains_key("rejected.tsv") && want.contains_key(".sharder-plan"), "{:?}", want.keys());
    for (sig, name, code) in [("-INT", "SIGINT", 130), ("-TERM", "SIGTERM", 143)] {
        let out = tmp.path().join(name);
        let mut c = build_cmd(&fx.train_dir, &out, &[]);
        let mut child = c.env(PAUSE_ENV, "10").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (paused_tx, paused) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("sharder: paused") {
                    let _ = paused_tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        if paused.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = child.kill();
            panic!("{name}: never paused (is the binary built with feature test-hooks?): {}", reader.join().unwrap());
        }
        // Paused after 10 input files: complete shards on disk and one in progress.
        let before = dir_files(&out);
        let complete: Vec<&String> = before.keys().filter(|n| n.ends_with(".tar")).collect();
        assert!(!complete.is_empty(), "{name}: {:?}", before.keys());
        assert!(before.keys().any(|n| n.ends_with(".tar.tmp")), "{name}: no shard in progress: {:?}", before.keys());

        assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
        let status = child.wait().unwrap();
        let stderr = reader.join().unwrap();
        assert_eq!(status.code(), Some(code), "{name}: {stderr}");
        assert!(stderr.contains(name) && stderr.contains("--resume"), "{name}: {stderr}");
        let after = dir_files(&out);
        let tars: Vec<&String> = after.keys().filter(|n| n.ends_with(".tar")).collect();
        assert_eq!(tars, complete, "{name}: the complete shards are kept");
        assert!(!after.keys().any(|n| n.ends_with(".tmp")), "{name}: the shard in progress is dropped");
        assert!(!after.contains_key("manifest.json"), "{name}: an interrupted build has no manifest");
        let journal = String::from_utf8_lossy(&after[JOURNAL_FILE]).into_owned();
        assert_eq!(journal.lines().count(), 1 + complete.len(), "{name}: each complete shard journaled: {journal}");

        let o = run(build_cmd(&fx.train_dir, &out, &["--resume"]));
        assert!(o.status.success(), "{name}: {}", text(&o));
        let got = dir_files(&out);
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{name}");
        for (file, bytes) in &want {
            assert!(got[file] == *bytes, "{name}: {file} differs from the uninterrupted build's");
        }
    }
}

/// `--resume` with another option than the interrupted (or finished) build's is refused, naming
/// the option with both values; a changed input is named too.
#[test]
fn a_changed_option_on_resume_is_refused_by_name() {
    let (_tmp, fx, out) = interrupted(1);
    let journal = std::fs::read(out.join(JOURNAL_FILE)).unwrap();
    for (extra, named) in [
        (&["--seed", "7"][..], "--seed was 0, now 7"),
        (&["--shard-max-bytes", "500000"][..], "--shard-max-bytes was 1073741824, now 500000"),
        (&["--validate", "header"][..], "--validate was decode, now header"),
    ] {
        let o = run(build_cmd(&fx.train_dir, &out, &[&["--resume"][..], extra].concat()));
        assert!(!o.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(named) && err.contains("--force"), "{extra:?}: {err}");
        assert_eq!(std::fs::read(out.join(JOURNAL_FILE)).unwrap(), journal, "a refusal changes nothing");
    }
    let o = run(build_cmd(&fx.train_dir, &out, &["--resume"]));
    assert!(o.status.success(), "{}", text(&o));

    // Over a finished build: the same.
    let o = run(build_cmd(&fx.train_dir, &out, &["--resume", "--max-side", "100"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--max-side was none, now 100"), "{err}");
    std::fs::write(fx.train_dir.join(cae_tools::fixtures::wnid(0)).join("new.JPEG"), b"x").unwrap();
    let o = run(build_cmd(&fx.train_dir, &out, &["--resume"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("input files changed"), "{err}");
}

/// `sharder verify` on an interrupted build says it is unfinished and to `--resume` it.
#[test]
fn verify_on_an_interrupted_build_suggests_resume() {
    let (_tmp, fx, out) = interrupted(2);
    let v = run(verify_cmd(&out));
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(!v.status.success(), "{err}");
    assert!(err.contains("unfinished build (2 complete shard(s) journaled") && err.contains("--resume"), "{err}");
    let o = run(build_cmd(&fx.train_dir, &out, &["--resume"]));
    assert!(o.status.success(), "{}", text(&o));
    let v = run(verify_cmd(&out));
    assert!(v.status.success(), "{}", text(&v));
}

fn journal_kept(out: &Path) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(out.join(JOURNAL_FILE)).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let samples = lines.iter().map(|l| l["shard"]["samples"].as_u64().unwrap()).sum();
    let inputs = lines.last().map_or(0, |l| l["next_input"].as_u64().unwrap());
    let rejected = lines.iter().map(|l| l["rejected"].as_array().unwrap().len() as u64).sum();
    (samples, inputs, rejected)
}

/// The resumed build's summary counts what this run wrote, and says what was already there.
#[test]
fn the_resumed_summary_counts_this_runs_work_and_what_was_kept() {
    let (_tmp, fx, out) = interrupted(2);
    let (kept_samples, kept_inputs, kept_rejected) = journal_kept(&out);
    let o = run(build_cmd(&fx.train_dir, &out, &["--resume"]));
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let total = |k: &str| m[k].as_u64().unwrap();
    let shards = m["shards"].as_array().unwrap().len() as u64;
    assert_eq!(kept_samples, 8, "2 complete shards of 4 were kept");
    let kept =
        format!("resumed: kept 2 complete shards already there ({kept_samples} samples from {kept_inputs} input files");
    assert!(stdout.contains(&kept), "{kept:?} in {stdout}");
    let (inputs, samples) = (total("input_files") - kept_inputs, total("total_samples") - kept_samples);
    let this = format!("this run: {inputs} input files: {samples} sharded into {} shards (", shards - 2);
    assert!(stdout.contains(&this), "{this:?} in {stdout}");
    assert!(stdout.contains(&format!(", {} rejected\n", total("rejected") - kept_rejected)), "{stdout}");
    assert!(stdout.contains(&format!("processed {inputs} files")), "{stdout}");
    let whole = format!(
        "whole set: {} input files: {} sharded into {shards} shards",
        total("input_files"),
        total("total_samples")
    );
    assert!(stdout.contains(&whole), "{whole:?} in {stdout}");

    let o = run(build_cmd(&fx.train_dir, &out, &["--resume"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("already complete, nothing to do"), "{}", text(&o));
}

/// `--list` without `--classes` warns that the class indices are the list's own; with the train
/// set's classes.txt it does not.
#[test]
fn list_without_classes_warns_that_indices_may_not_match_a_train_set() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"));
    let train = tmp.path().join("train");
    reference(&fx.train_dir, &train);
    // A val-style list that lacks the first class: its indices would shift against train's.
    let first = cae_tools::fixtures::wnid(0);
    let rows: String = fx
        .files
        .iter()
        .filter(|f| f.odd.is_none() && f.class != first)
        .map(|f| format!("{}\t{}\n", f.rel_path, f.class))
        .collect();
    let list: PathBuf = tmp.path().join("val.tsv");
    std::fs::write(&list, rows).unwrap();
    let val = |out: &str, extra: &[&str]| {
        let mut c = build_cmd(&fx.train_dir, &tmp.path().join(out), &["--prefix", "val", "--list"]);
        c.arg(&list).args(extra);
        let o = run(c);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = val("val-own", &[]);
    assert!(err.contains("--list without --classes") && err.contains("own 2 classes"), "{err}");
    let classes = train.join("classes.txt");
    let err = val("val-train", &["--classes", classes.to_str().unwrap()]);
    assert!(!err.contains("--list without --classes"), "{err}");
    let own = std::fs::read_to_string(tmp.path().join("val-own").join("classes.txt")).unwrap();
    assert_eq!(own.lines().count(), 2, "the list's own classes: {own}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("val-train").join("classes.txt")).unwrap(),
        std::fs::read_to_string(classes).unwrap()
    );
}
