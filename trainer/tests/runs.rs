//! Runs that never lose work, end to end through the real `trainer` binary (its exit status is
//! part of the interface: schedulers read it). README "Exit status" lists the codes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cae_trainer::checkpoint::{Checkpoint, locate};
use cae_trainer::train::{STEP_LOG, read_step_log};

mod common;
use common::{files_under as walk, run_args as args, shards, text};

const BIN: &str = env!("CARGO_BIN_EXE_trainer");

fn spawn(args: &[String], envs: &[(&str, &str)]) -> Child {
    let mut c = Command::new(BIN);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().expect("spawn trainer")
}

fn run(args: &[String]) -> Output {
    spawn(args, &[]).wait_with_output().unwrap()
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

/// SIGTERM and SIGHUP finish the step, write its checkpoint and exit with 128 + N, so a
/// scheduler does not take a preempted run for a finished one.
#[test]
fn a_signal_checkpoints_and_exits_with_128_plus_its_number() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let d = data.to_string_lossy().into_owned();
    let run_dir = tmp.path().join("run");
    for (sig, code) in [("-TERM", 143), ("-HUP", 129)] {
        let resume: &[&str] = if code == 143 { &[] } else { &["--resume"] };
        let mut child = spawn(&args(&d, &run_dir, 100_000, resume), &[]);
        // Let it run a few steps (the log is read back every log_every = 20 steps).
        let log = run_dir.join(STEP_LOG);
        let t = Instant::now();
        let before = read_step_log(&log).map(|l| l.len()).unwrap_or(0);
        while read_step_log(&log).map(|l| l.len()).unwrap_or(0) <= before {
            assert!(t.elapsed() < Duration::from_secs(120), "no steps logged");
            std::thread::sleep(Duration::from_millis(100));
        }
        signal(&child, sig);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{sig}");
        let ck = Checkpoint::read(&locate(&run_dir).unwrap()).unwrap();
        let log = read_step_log(&log).unwrap();
        assert_eq!(ck.header.step, log.last().unwrap().step, "{sig}: the checkpoint holds the last step");
    }
}

/// A fresh run refuses a directory that holds a run (exit 2); `--force` moves the old run aside
/// (nothing deleted) and starts over.
#[test]
fn a_run_directory_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let d = data.to_string_lossy().into_owned();
    let run_dir = tmp.path().join("run");
    let first = run(&args(&d, &run_dir, 3, &[]));
    assert!(first.status.success(), "{}", text(&first));
    let old_log = std::fs::read_to_string(run_dir.join(STEP_LOG)).unwrap();
    let old_ck = locate(&run_dir).unwrap();

    let again = run(&args(&d, &run_dir, 2, &[]));
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("holds a run") && text(&again).contains("--force"), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(run_dir.join(STEP_LOG)).unwrap(), old_log, "untouched");
    assert!(old_ck.is_file());

    let forced = run(&args(&d, &run_dir, 2, &["--force"]));
    assert!(forced.status.success(), "{}", text(&forced));
    let aside: Vec<PathBuf> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read_to_string(aside[0].join(STEP_LOG)).unwrap(), old_log, "the old run is kept");
    assert!(aside[0].join("checkpoints").join(old_ck.file_name().unwrap()).is_file());
    assert_eq!(read_step_log(&run_dir.join(STEP_LOG)).unwrap().len(), 2, "the new run");
    assert_eq!(Checkpoint::read(&locate(&run_dir).unwrap()).unwrap().header.step, 2);
}

/// A second trainer on a directory in use refuses (exit 2, naming the holder); once the holder
/// is gone (kill -9), its lock is taken over and the run resumes.
#[test]
fn a_locked_run_directory_is_refused_and_a_dead_lock_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let d = data.to_string_lossy().into_owned();
    let run_dir = tmp.path().join("run");
    let flags: &[&str] = &["--checkpoint-every", "1"];
    let mut holder = spawn(&args(&d, &run_dir, 100_000, flags), &[]);
    let t = Instant::now();
    while locate(&run_dir).is_err() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The launch command re-run with --resume added (its flags resolve to the saved config).
    let again: &[&str] = &["--checkpoint-every", "1", "--resume"];
    let second = run(&args(&d, &run_dir, 100_000, again));
    assert_eq!(second.status.code(), Some(2), "{}", text(&second));
    assert!(text(&second).contains("in use by another trainer") && text(&second).contains(&holder.id().to_string()));
    signal(&holder, "-KILL");
    holder.wait().unwrap();
    let step = Checkpoint::read(&locate(&run_dir).unwrap()).unwrap().header.step;
    let mut resumed = spawn(&args(&d, &run_dir, 100_000, again), &[]);
    let t = Instant::now();
    while Checkpoint::read(&locate(&run_dir).unwrap()).map_or(true, |c| c.header.step <= step) {
        assert!(t.elapsed() < Duration::from_secs(120), "the resumed run made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(&resumed, "-TERM");
    assert_eq!(resumed.wait().unwrap().code(), Some(143));
}

/// `trainer run | head -1`: a closed stdout stops the output, not the run.
#[test]
fn a_closed_stdout_does_not_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let run_dir = tmp.path().join("run");
    let mut child = spawn(&args(&data.to_string_lossy(), &run_dir, 30, &["--set", "log_every=1"]), &[]);
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(!first.is_empty()); // the reader is dropped here: stdout is closed
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(Checkpoint::read(&locate(&run_dir).unwrap()).unwrap().header.step, 30);
}

/// Size-like config values have bounds: an absurd one is a config error (exit 2), not an
/// allocation abort.
#[test]
fn oversized_config_values_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    for set in ["data.shuffle_buffer=1099511627776", "data.batch_size=100000000", "model.embed_dim=1048576"] {
        let o = run(&args("unused", &tmp.path().join("r"), 1, &["--set", set]));
        assert_eq!(o.status.code(), Some(2), "{set}: {}", text(&o));
        let key = set.split('=').next().unwrap();
        assert!(text(&o).contains(key), "{set}: {}", text(&o));
    }
}

/// A fatal data error (more than 1 % bad samples) first writes a checkpoint of the last
/// completed step, then exits 1.
#[test]
fn a_fatal_data_error_leaves_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = cae_tools::fixtures::FixtureSpec { classes: 1, per_class: 8, seed: 2, odd_files: false, max_side: 96 };
    let fx = cae_tools::fixtures::generate(&tmp.path().join("img"), &spec).unwrap();
    let jpegs: Vec<Vec<u8>> = walk(&fx.train_dir).into_iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!jpegs.is_empty());
    // 240 good samples, then garbage: the loader's bad-sample limit trips after ~50 steps.
    let shard = tmp.path().join("mixed.tar");
    let mut w = cae_pipeline::wds::ShardWriter::create(&shard).unwrap();
    for i in 0..400 {
        let garbage = vec![0x5au8; 64];
        let jpg: &[u8] = if i < 240 { &jpegs[i % jpegs.len()] } else { &garbage };
        w.write_sample(&format!("s{i:04}"), &[("jpg", jpg), ("cls", b"0")]).unwrap();
    }
    w.finish().unwrap();
    let run_dir = tmp.path().join("run");
    let o = run(&args(&shard.to_string_lossy(), &run_dir, 10_000, &[]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("bad samples"), "{}", text(&o));
    let ck = Checkpoint::read(&locate(&run_dir).expect("a checkpoint was written")).unwrap();
    let log = read_step_log(&run_dir.join(STEP_LOG)).unwrap();
    assert!(ck.header.step >= 1);
    assert_eq!(ck.header.step, log.last().unwrap().step, "the last completed step");
}

/// Checkpoints hold absolute paths: a run started with relative paths resumes from another
/// working directory.
#[test]
fn a_run_resumes_from_another_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    shards(tmp.path());
    let first =
        Command::new(BIN).current_dir(tmp.path()).args(args("shards", Path::new("run"), 3, &[])).output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let run_dir = tmp.path().join("run");
    let resumed = Command::new(BIN)
        .current_dir(&elsewhere)
        .args(["run", "--resume", &run_dir.to_string_lossy(), "--steps", "5", "--metrics-addr", "off", "--no-progress"])
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(Checkpoint::read(&locate(&run_dir).unwrap()).unwrap().header.step, 5);
}

/// Credentials and signatures in shard URLs reach neither the output nor the checkpoints; a
/// resume then asks for --shards.
#[test]
fn no_secret_reaches_logs_or_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    // A local shard set plus a URL with secrets that cannot be reached (port 1 on loopback).
    let secret = "http://alice:pa55w0rd@127.0.0.1:1/x.tar?X-Amz-Signature=d3adb33f";
    let source = format!("{}::{secret}", data.join("train-000000.tar").display());
    let run_dir = tmp.path().join("run");
    let o = run(&args(&source, &run_dir, 2, &["--set", "data.http.retries=0", "--set", "data.max_failed_shards=1"]));
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    for s in ["pa55w0rd", "alice", "d3adb33f"] {
        assert!(!all.contains(s), "{s} printed:\n{all}");
        let ck = std::fs::read(locate(&run_dir).unwrap()).unwrap();
        assert!(!String::from_utf8_lossy(&ck).contains(s), "{s} stored in the checkpoint");
    }
    let resumed = run(&["run", "--resume", &run_dir.to_string_lossy(), "--metrics-addr", "off"].map(String::from));
    assert_eq!(resumed.status.code(), Some(2), "{}", text(&resumed));
    assert!(text(&resumed).contains("pass --shards"), "{}", text(&resumed));
}

/// `--resume FILE` from an older checkpoint starts a new branch: the abandoned branch's later
/// checkpoints move to `checkpoints/abandoned-*/` (kept, never pruned by the new branch), the
/// new checkpoints record their parents, the step log is rewritten to the new branch, and
/// `--resume DIR` then continues the new branch.
#[test]
fn a_rewind_starts_a_new_branch_and_keeps_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let d = data.to_string_lossy().into_owned();
    let run_dir = tmp.path().join("run");
    let every: &[&str] = &["--checkpoint-every", "2"];
    let first = run(&args(&d, &run_dir, 6, every));
    assert!(first.status.success(), "{}", text(&first));
    let ckdir = run_dir.join("checkpoints");
    let old6 = std::fs::read(ckdir.join("step-00000006.ckpt")).unwrap();
    // Rewind to step 2 and go on to step 4.
    let rewind: Vec<String> = [
        "run",
        "--resume",
        &ckdir.join("step-00000002.ckpt").to_string_lossy(),
        "--steps",
        "4",
        "--metrics-addr",
        "off",
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    let o = run(&rewind);
    assert!(o.status.success(), "{}", text(&o));
    let abandoned: Vec<PathBuf> = std::fs::read_dir(&ckdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("abandoned-"))
        .collect();
    assert_eq!(abandoned.len(), 1, "{}", text(&o));
    assert_eq!(std::fs::read(abandoned[0].join("step-00000006.ckpt")).unwrap(), old6, "the old branch is kept");
    assert!(abandoned[0].join("step-00000004.ckpt").is_file());
    let latest = locate(&run_dir).unwrap();
    assert_eq!(latest.file_name().unwrap(), "step-00000004.ckpt", "latest = newest of the current lineage");
    let ck = Checkpoint::read(&latest).unwrap();
    assert_eq!(ck.header.parent.as_deref(), Some("step-00000002.ckpt"));
    let log = read_step_log(&run_dir.join(STEP_LOG)).unwrap();
    assert_eq!(log.iter().map(|l| l.step).collect::<Vec<_>>(), vec![1, 2, 3, 4], "the log follows the new branch");
    // --resume DIR continues the new branch, recording its parent.
    let more: Vec<String> =
        ["run", "--resume", &run_dir.to_string_lossy(), "--steps", "6", "--metrics-addr", "off", "--no-progress"]
            .map(String::from)
            .to_vec();
    let o = run(&more);
    assert!(o.status.success(), "{}", text(&o));
    let ck = Checkpoint::read(&locate(&run_dir).unwrap()).unwrap();
    assert_eq!((ck.header.step, ck.header.parent.as_deref()), (6, Some("step-00000004.ckpt")));
}

/// `--resume DIR` whose newest checkpoint is corrupt takes the newest valid one, naming the
/// skipped file.
#[test]
fn resume_falls_back_past_a_corrupt_newest_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let d = data.to_string_lossy().into_owned();
    let run_dir = tmp.path().join("run");
    let first = run(&args(&d, &run_dir, 4, &["--checkpoint-every", "2"]));
    assert!(first.status.success(), "{}", text(&first));
    let newest = run_dir.join("checkpoints/step-00000004.ckpt");
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff; // a flipped bit in the last section
    std::fs::write(&newest, &bytes).unwrap();
    let more: Vec<String> =
        ["run", "--resume", &run_dir.to_string_lossy(), "--steps", "4", "--metrics-addr", "off", "--no-progress"]
            .map(String::from)
            .to_vec();
    let o = run(&more);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("skipping a corrupt checkpoint") && text(&o).contains("step-00000004.ckpt"));
    assert!(text(&o).contains("resuming from") && text(&o).contains("step 2"), "{}", text(&o));
}

/// A cut `.pth` (the issue's case: `trainer export` of a cut mmselfsup backbone loaded zeros and
/// exited 0) exits 1 naming a tensor of the cut storage, and writes nothing; the whole file exports.
#[test]
fn a_cut_torch_file_fails_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/cae_mmselfsup_micro_backbone_legacy.pth");
    let bytes = std::fs::read(&golden).unwrap();
    let cut = tmp.path().join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() - 3000]).unwrap();
    let export = |from: &Path, out: &Path| {
        let a: Vec<String> = ["export", "--checkpoint", &from.to_string_lossy(), "--format", "timm", "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.to_string_lossy().into_owned()])
            .collect();
        run(&a)
    };
    let whole = export(&golden, &tmp.path().join("whole.safetensors"));
    assert!(whole.status.success(), "{}", text(&whole));
    let o = export(&cut, &tmp.path().join("cut.safetensors"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cut.pth") && text(&o).contains("layers."), "{}", text(&o));
    assert!(!tmp.path().join("cut.safetensors").exists());
}
