//! A new user's first day, end to end through the real `trainer` binary: a failed start leaves
//! nothing behind and its corrected retry runs into the same `--out`; conflicting flags fail
//! before anything is created; a scrape before the first step lists every series; a changed
//! image size is one `--set`; Ctrl-C is acknowledged at once; a resume with one `--set` names
//! that key only; a peak lr below `min_lr` is said; `bench --json` prints only its JSON.
//!
//! The metrics test uses the `test-hooks` feature (on in `cargo test --workspace`: the `tests`
//! crate enables it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cae_trainer::train::{HANG_ENV, STEP_LOG, read_step_log};

mod common;
use common::{args, free_port, run, scrape, shards, spawn, text};

/// Every way a start can fail before training exits 2 and creates nothing; then the corrected
/// command runs into the same `--out`. A directory with only what a failed start of an older
/// version left (a config, an empty step log, a lock) is empty for a fresh run, and `--resume`
/// on it says there is no checkpoint.
#[test]
fn a_failed_start_leaves_nothing_and_its_retry_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let d = data.to_string_lossy().into_owned();
    let out = tmp.path().join("runs/x");
    let typo = tmp.path().join("shards/trian").to_string_lossy().into_owned();
    let nope = tmp.path().join("nope.toml").to_string_lossy().into_owned();
    let tokenizer = format!("tokenizer.weights=\"{}\"", tmp.path().join("no.pth").display());
    let cases: [(Vec<String>, &str); 5] = [
        (args(&typo, &out, 2, &[]), "do not exist"),
        (args(&d, &out, 2, &["--set", "model.target=\"dalle\"", "--set", &tokenizer]), "no.pth"),
        (args(&d, &out, 2, &["--device", "cuda"]), "--features cuda"),
        (args(&d, &out, 2, &["--config", &nope]), "nope.toml"),
        (args(&d, &out, 2, &["--metrics-addr", "localhost"]), "--metrics-addr"),
    ];
    for (a, needle) in cases {
        if a.contains(&"cuda".to_string()) && cfg!(feature = "cuda") {
            continue;
        }
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {}", text(&o));
        assert!(text(&o).contains(needle), "{needle:?} not in {}", text(&o));
        assert!(!out.exists() && !tmp.path().join("runs").exists(), "{a:?} created {}", out.display());
    }
    // What an older failed start left: no checkpoint, so nothing to resume and nothing to keep.
    std::fs::create_dir_all(&out).unwrap();
    for f in [".lock", "config.toml", STEP_LOG] {
        std::fs::write(out.join(f), "").unwrap();
    }
    let resumed = run(&args(&d, &out, 2, &["--resume"]));
    assert_eq!(resumed.status.code(), Some(2), "{}", text(&resumed));
    assert!(text(&resumed).contains("no checkpoint") && text(&resumed).contains("without --resume"));
    let fixed = run(&args(&d, &out, 2, &[]));
    assert!(fixed.status.success(), "{}", text(&fixed));
    assert_eq!(read_step_log(&out.join(STEP_LOG)).unwrap().len(), 2);
    // `--resume auto`: the same line continues it (nothing to do at its end) ...
    let again = run(&args(&d, &out, 3, &["--resume", "auto"]));
    assert!(again.status.success() && text(&again).contains("resuming from"), "{}", text(&again));
    assert_eq!(read_step_log(&out.join(STEP_LOG)).unwrap().len(), 3);
    // ... and starts a run where there is none.
    let fresh = tmp.path().join("runs/y");
    let first = run(&args(&d, &fresh, 1, &["--resume", "auto"]));
    assert!(first.status.success() && text(&first).contains("starting a fresh run"), "{}", text(&first));
}

/// Flag conflicts are clap's: they fail (exit 2) before the run directory exists.
#[test]
fn conflicting_flags_fail_before_the_run_dir_is_made() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for extra in [&["--init-from", "x.pth", "--resume"][..], &["--epochs", "3"], &["--force", "--resume"]] {
        let o = run(&args("shards", &out, 2, extra));
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", text(&o));
        assert!(text(&o).contains("cannot be used with"), "{}", text(&o));
        assert!(!out.exists(), "{extra:?}");
    }
}

/// Waits until the child's stderr has a line containing `needle` (stderr drained in a thread).
fn wait_for_stderr(child: &mut Child, needle: &str, timeout: Duration) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = needle.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&wanted) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| panic!("the trainer never printed {needle:?}"));
}

/// Before the first step (the test hook holds the run there), every series the trainer and the
/// pipeline document is served, with help text and a sample; the step counter is 0.
#[test]
fn a_scrape_before_the_first_step_lists_every_series() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path()).to_string_lossy().into_owned();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut a = args(&data, &tmp.path().join("run"), 100, &[]);
    let i = a.iter().position(|x| x == "off").unwrap();
    a[i] = addr;
    let mut child = spawn(&a, &[(HANG_ENV, "0")]);
    wait_for_stderr(&mut child, "hang after step 0", Duration::from_secs(120));
    let body = scrape(port);
    child.kill().unwrap();
    child.wait().unwrap();
    let names = cae_trainer::metrics::ALL.iter().chain(cae_pipeline::metrics::ALL);
    for name in names {
        assert!(body.contains(&format!("# HELP {name} ")), "no help text for {name}:\n{body}");
        assert!(body.lines().any(|l| l.starts_with(name) && !l.starts_with('#')), "no sample of {name}:\n{body}");
    }
    assert!(body.lines().any(|l| l == "cae_train_steps_total 0"), "{body}");
    for kind in cae_pipeline::metrics::ERROR_KINDS {
        let series = format!("cae_pipeline_errors_total{{kind=\"{kind}\"}} 0");
        assert!(body.lines().any(|l| l == series), "no {series}:\n{body}");
    }
}

/// `--set model.img_size=96` alone moves the view sizes, the mask grid and count: the micro
/// preset trains at 96 px, and the saved config states the image size once.
#[test]
fn micro_at_96_px_is_one_set() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path()).to_string_lossy().into_owned();
    let out = tmp.path().join("run");
    let o = run(&args(&data, &out, 40, &["--set", "model.img_size=96"]));
    assert!(o.status.success(), "{}", text(&o));
    let log = read_step_log(&out.join(STEP_LOG)).unwrap();
    assert_eq!(log.len(), 40);
    assert!(log.iter().all(|s| s.loss.is_finite()));
    let mean = |s: &[cae_trainer::train::StepLog]| s.iter().map(|x| x.loss).sum::<f64>() / s.len() as f64;
    assert!(mean(&log[30..]) < mean(&log[..10]), "the loss falls at 96 px");
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains("img_size = 96") && !saved.contains("view_size"), "{saved}");
    let c = cae_trainer::config::RunConfig::from_resolved_toml(&saved).unwrap();
    assert_eq!((c.data.augment.view_size, c.data.mask.grid, c.data.mask.num_masked), (96, 6, 14));
}

/// Ctrl-C is acknowledged at once (the step in flight may take long), then the run checkpoints
/// and exits 130; the resumed run, given one `--set` that differs, names that key and no other.
#[test]
fn ctrl_c_is_acknowledged_and_a_changed_key_is_named_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path()).to_string_lossy().into_owned();
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, "preset = \"micro\"\nlog_every = 1\n[optimizer]\nlr = 1e-3\n").unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    let child = spawn(&args(&data, &out, 100_000, &["--config", &cfg]), &[]);
    let t = Instant::now();
    while read_step_log(&out.join(STEP_LOG)).map_or(0, |l| l.len()) < 2 {
        assert!(t.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(text(&o).contains("SIGINT received: stopping after this step"), "{}", text(&o));

    let changed = run(&args(&data, &out, 100_000, &["--resume", "--set", "data.batch_size=8"]));
    assert_eq!(changed.status.code(), Some(2), "{}", text(&changed));
    let said = text(&changed);
    let keys = said.split(" in ").nth(1).and_then(|r| r.split(';').next()).unwrap_or_default();
    assert_eq!(keys, "data.batch_size", "{said}");
}

/// A scaled peak lr below `min_lr` is said, naming both.
#[test]
fn a_peak_lr_below_min_lr_is_said() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path()).to_string_lossy().into_owned();
    let o = run(&args(&data, &tmp.path().join("run"), 1, &["--set", "optimizer.lr=1e-6"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("is below optimizer.min_lr 1.000e-5"), "{}", text(&o));
}

/// `trainer bench --json` prints one JSON object on stdout and nothing else (a script parses it).
#[test]
fn bench_json_is_the_only_thing_on_stdout() {
    let a = ["bench", "--synthetic-only", "--json", "--steps", "2", "--warmup", "1", "--set", "data.batch_size=4"];
    let o = Command::new(common::BIN).args(a).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v["synthetic"]["images_per_second"].as_f64().is_some_and(|x| x > 0.0), "{v}");
}
