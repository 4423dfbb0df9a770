//! End-to-end tests of `trainer run` on the CPU (micro preset, small built-in data): exact resume
//! after kill -9, SIGTERM checkpoints, the Prometheus endpoint, and the loss going down.
//!
//! Every trainer runs in a child process: this test binary re-executed with the ignored
//! `child_trainer` test, which calls `cae_trainer::cli::main_from` with the arguments in
//! `TRAINER_ARGS` (a JSON array). Signals and kill -9 then hit a real, separate process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cae_sharder::{BuildOptions, build};
use cae_tools::fixtures::{FixtureSpec, generate};
use cae_trainer::checkpoint::{Checkpoint, list, locate};
use cae_trainer::train::{HANG_ENV, STEP_LOG, StepLog, read_step_log};

// The HTTP tests' file server (faults injected per file name).
#[allow(dead_code)]
#[path = "pipeline/http_server.rs"]
mod http_server;

const ARGS_ENV: &str = "TRAINER_ARGS";

/// Runs in a child process (re-executed test binary).
#[test]
#[ignore = "helper: run by the trainer tests in a child process"]
fn child_trainer() {
    let Ok(json) = std::env::var(ARGS_ENV) else { return };
    let args: Vec<String> = serde_json::from_str(&json).expect("TRAINER_ARGS is a JSON array");
    if let Err(e) = cae_trainer::cli::main_from(args) {
        // As the `trainer` binary: the error, then its exit status (README "Exit status").
        eprintln!("trainer failed: {e:#}");
        std::process::exit(i32::from(cae_trainer::cli::exit_code(&e)));
    }
}

/// Small built-in data: classes x per_class images (no odd files), sharded with a manifest.
fn shards(dir: &Path, classes: usize, per_class: usize) -> PathBuf {
    let fx = generate(&dir.join("img"), &FixtureSpec { classes, per_class, seed: 5, odd_files: false, max_side: 160 })
        .expect("fixtures");
    let out = dir.join("shards");
    let mut o = BuildOptions::new(&fx.train_dir, &out);
    o.shard_max_samples = 16;
    o.workers = 2;
    build(&o).expect("sharder build");
    out
}

/// `trainer run` arguments for micro on `shards`, batch 8.
fn run_args(shards: &Path, out: &Path, steps: u64, every: u64) -> Vec<String> {
    let mut a: Vec<String> = vec!["trainer".into(), "run".into()];
    for (k, v) in [
        ("--shards", shards.to_string_lossy().into_owned()),
        ("--out", out.to_string_lossy().into_owned()),
        ("--metrics-addr", "off".into()),
        ("--steps", steps.to_string()),
        ("--checkpoint-every", every.to_string()),
        ("--set", "data.batch_size=8".into()),
        ("--set", "data.workers=2".into()),
        ("--set", "data.shuffle_buffer=24".into()),
        ("--set", "log_every=1000".into()),
    ] {
        a.push(k.into());
        a.push(v);
    }
    a.push("--no-progress".into());
    a
}

fn spawn(args: &[String], envs: &[(&str, String)]) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["child_trainer", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ARGS_ENV, serde_json::to_string(args).unwrap())
        .env_remove(HANG_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().expect("spawn child trainer")
}

/// Runs a child to completion; panics with its output when it fails.
fn run_ok(args: &[String]) -> String {
    let out = spawn(args, &[]).wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "trainer failed:\n{text}");
    text
}

/// Waits until the child's stderr contains `needle`; returns the child (stderr drained in a thread).
fn wait_for_stderr(child: &mut Child, needle: &str, timeout: Duration) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = needle.to_string();
    std::thread::spawn(move || {
        let mut seen = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !seen && line.contains(&wanted) {
                seen = true;
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| panic!("child never printed {needle:?}"));
}

/// Waits until the run's step log has at least `n` lines.
fn wait_for_steps(run: &Path, n: usize, child: &mut Child, timeout: Duration) {
    let t = Instant::now();
    loop {
        if let Ok(log) = read_step_log(&run.join(STEP_LOG))
            && log.len() >= n
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut s = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut s);
            }
            panic!("child exited early ({status}):\n{s}");
        }
        assert!(t.elapsed() < timeout, "fewer than {n} steps after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} failed");
}

fn bits(log: &[StepLog]) -> Vec<(u64, u64, u64, u64, u64, u64)> {
    log.iter()
        .map(|s| {
            (
                s.step,
                s.loss.to_bits(),
                s.loss_main.to_bits(),
                s.loss_align.to_bits(),
                s.lr.to_bits(),
                s.grad_norm.to_bits(),
            )
        })
        .collect()
}

#[test]
fn kill_9_then_resume_gives_the_uninterrupted_losses_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 3, 16); // 48 samples: 6 batches of 8 per epoch
    let steps = 14; // crosses two epoch boundaries

    // Uninterrupted reference run.
    let a = tmp.path().join("a");
    run_ok(&run_args(&data, &a, steps, 0));
    let ref_log = read_step_log(&a.join(STEP_LOG)).unwrap();
    assert_eq!(ref_log.iter().map(|s| s.step).collect::<Vec<_>>(), (1..=steps).collect::<Vec<_>>());
    assert_eq!(ref_log[0].lr, 0.0, "lr(0) = 0");
    assert!(ref_log.windows(2).any(|w| w[0].loss != w[1].loss), "losses must vary");

    // Same run, checkpoint every 4 steps, killed with SIGKILL after step 6 (steps 5 and 6 are
    // logged but not checkpointed: the resume must redo them).
    let b = tmp.path().join("b");
    let mut child = spawn(&run_args(&data, &b, steps, 4), &[(HANG_ENV, "6".into())]);
    wait_for_stderr(&mut child, "hang after step 6", Duration::from_secs(60));
    child.kill().expect("kill -9");
    child.wait().unwrap();
    let ckpts: Vec<u64> = list(&b).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(ckpts, vec![4]);
    assert_eq!(read_step_log(&b.join(STEP_LOG)).unwrap().len(), 6);

    // Resume from the run dir (its latest checkpoint), with no other run flags.
    let out = run_ok(&[
        "trainer".into(),
        "run".into(),
        "--resume".into(),
        b.to_string_lossy().into_owned(),
        // no --shards: the checkpoint names its shard source
        "--metrics-addr".into(),
        "off".into(),
        "--no-progress".into(),
    ]);
    assert!(out.contains("resuming from"), "{out}");
    let resumed = read_step_log(&b.join(STEP_LOG)).unwrap();
    assert_eq!(bits(&resumed), bits(&ref_log), "resumed losses differ:\n{resumed:?}\nvs\n{ref_log:?}");
    // Both runs end with a checkpoint at the last step holding the same loader position.
    let (ca, cb) = (Checkpoint::read(&locate(&a).unwrap()).unwrap(), Checkpoint::read(&locate(&b).unwrap()).unwrap());
    assert_eq!((ca.header.step, cb.header.step), (steps, steps));
    assert_eq!(ca.header.loader, cb.header.loader);
    assert_eq!(ca.header.loader.epoch, 2, "14 batches of 6 per epoch end in epoch 2");
}

#[test]
fn a_second_signal_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 2, 8);
    let run = tmp.path().join("run");
    // The child hangs after step 2: the first SIGTERM only sets the stop flag, the second one
    // must end the process without waiting for the step loop.
    let mut child = spawn(&run_args(&data, &run, 1000, 0), &[(HANG_ENV, "2".into())]);
    wait_for_stderr(&mut child, "hang after step 2", Duration::from_secs(60));
    signal(&child, "-TERM");
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "one signal must not kill the process");
    signal(&child, "-TERM");
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(143), "second SIGTERM: immediate exit with 128 + 15");
    assert!(list(&run).map(|l| l.is_empty()).unwrap_or(true), "no checkpoint was written");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The value of an unlabelled series in Prometheus text format.
fn value(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn metrics_endpoint_serves_the_named_series() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 2, 12);
    let run = tmp.path().join("run");
    let port = free_port();
    let mut args = run_args(&data, &run, 100_000, 0);
    let i = args.iter().position(|a| a == "off").unwrap();
    args[i] = format!("127.0.0.1:{port}");
    let mut child = spawn(&args, &[]);
    wait_for_steps(&run, 3, &mut child, Duration::from_secs(60));
    let body = scrape(port);
    signal(&child, "-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(143), "stopped by SIGTERM after its checkpoint");

    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for name in [
        "cae_train_steps_total",
        "cae_train_images_total",
        "cae_train_loss",
        "cae_train_loss_main",
        "cae_train_loss_align",
        "cae_train_lr",
        "cae_train_grad_norm",
        "cae_train_step_seconds",
        "cae_train_data_wait_seconds",
        "cae_train_images_per_second",
        "cae_pipeline_samples_total",
        "cae_pipeline_batches_popped_total",
    ] {
        assert!(body.contains(&format!("# HELP {name} ")), "no help text for {name}:\n{body}");
        assert!(body.lines().any(|l| l.starts_with(name) && !l.starts_with('#')), "no sample of {name}:\n{body}");
    }
    let steps = value(&body, "cae_train_steps_total").expect("steps counter");
    let images = value(&body, "cae_train_images_total").expect("images counter");
    assert!(steps >= 3.0, "{steps}");
    // 8 images per step (the images counter is bumped right after the steps counter).
    assert!(images == 8.0 * steps || images == 8.0 * (steps - 1.0), "{images} images after {steps} steps");
    let loss = value(&body, "cae_train_loss").expect("loss gauge");
    let logged = read_step_log(&run.join(STEP_LOG)).unwrap();
    assert!(logged.iter().any(|s| s.loss == loss), "the exported loss {loss} is one of the logged losses");
    assert!(value(&body, "cae_train_step_seconds_count").is_some_and(|c| c >= 3.0), "{body}");
}

#[test]
fn micro_loss_falls_on_builtin_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 4, 16);
    let run = tmp.path().join("run");
    let steps = 120;
    run_ok(&run_args(&data, &run, steps, 0));
    let log = read_step_log(&run.join(STEP_LOG)).unwrap();
    assert_eq!(log.len(), steps as usize);
    let mean = |s: &[StepLog]| s.iter().map(|x| x.loss).sum::<f64>() / s.len() as f64;
    let (early, late) = (mean(&log[..15]), mean(&log[log.len() - 15..]));
    eprintln!("micro on built-in data: mean loss of the first 15 steps {early:.4}, of the last 15 {late:.4}");
    assert!(late < 0.8 * early, "loss did not fall: {early} -> {late}");
    // Not only the alignment term (which the teacher copy makes easy): the pixel loss falls too.
    let main = |s: &[StepLog]| s.iter().map(|x| x.loss_main).sum::<f64>() / s.len() as f64;
    let (early_main, late_main) = (main(&log[..15]), main(&log[log.len() - 15..]));
    eprintln!("pixel loss: {early_main:.4} -> {late_main:.4}");
    assert!(late_main < 0.97 * early_main, "pixel loss did not fall: {early_main} -> {late_main}");
    assert!(log.iter().all(|s| s.loss.is_finite() && s.step_seconds > 0.0 && s.data_wait_seconds >= 0.0));
    assert!(log.iter().all(|s| s.data_wait_seconds <= s.step_seconds));
    // The JSONL keys are exactly the documented ones (checked on the raw text, not via StepLog).
    let first = std::fs::read_to_string(run.join(STEP_LOG)).unwrap();
    let line: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let mut keys: Vec<&str> = line.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "step",
        "loss",
        "loss_main",
        "loss_align",
        "lr",
        "grad_norm",
        "step_seconds",
        "data_wait_seconds",
        "images_per_second",
        "host_syncs",
    ];
    want.sort_unstable();
    assert_eq!(keys, want);
    // The resolved config is saved in the run dir and parses as a complete config.
    let saved = std::fs::read_to_string(run.join(cae_trainer::train::CONFIG_FILE)).unwrap();
    let c = cae_trainer::config::RunConfig::from_resolved_toml(&saved).unwrap();
    assert_eq!((c.data.batch_size, c.schedule.total_steps), (8, Some(steps)));

    features_and_knn_of_a_run(tmp.path(), &data, &run);
}

/// `trainer features` reads remote shards with the HTTP settings of the checkpoint's run
/// (`data.http`), not the defaults. The server answers the shard's first request with a 503:
/// the defaults retry it and load every sample; a run made with `data.http.retries=0` fails it.
#[test]
fn features_read_remote_shards_with_the_runs_http_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 2, 8); // 16 samples: one shard
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (default_run, strict_run) = (tmp.path().join("default"), tmp.path().join("strict"));
    run_ok(&run_args(&data, &default_run, 1, 0));
    let mut args = run_args(&data, &strict_run, 1, 0);
    args.extend(["--set".into(), "data.http.retries=0".into()]);
    run_ok(&args);

    let features = |run: &Path, out: &Path| {
        let shard = "train-000000.tar";
        let fault = http_server::Fault { status: Some((503, 1, None)), ..Default::default() };
        let server = http_server::serve(data.clone(), [(shard.to_string(), fault)].into());
        let url = format!("http://{}/{shard}", server.addr);
        let args =
            ["trainer", "features", "--checkpoint", &s(run), "--shards", &url, "--out", &s(out), "--no-progress"];
        let child = spawn(&args.map(String::from), &[]).wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
        (child.status.success(), text, server.requests_for(shard).len())
    };
    let (ok, text, requests) = features(&default_run, &tmp.path().join("a.safetensors"));
    assert!(ok && requests == 2, "the default settings retry the 503 ({requests} requests):\n{text}");
    assert!(text.contains("16 images"), "{text}");
    let (ok, text, requests) = features(&strict_run, &tmp.path().join("b.safetensors"));
    assert!(!ok && requests == 1, "retries = 0 from the run's config: one request, no retry ({requests}):\n{text}");
}

/// `trainer features` and `trainer eval knn` on the run's checkpoint (and the random-init
/// baseline), with a validation set of the same classes made with another seed.
fn features_and_knn_of_a_run(tmp: &Path, train: &Path, run: &Path) {
    let fx = generate(
        &tmp.join("val-img"),
        &FixtureSpec { classes: 4, per_class: 6, seed: 99, odd_files: false, max_side: 160 },
    )
    .expect("fixtures");
    let val = tmp.join("val-shards");
    build(&BuildOptions::new(&fx.train_dir, &val)).expect("sharder build");

    let feats = tmp.join("feats.safetensors");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    run_ok(
        &["trainer", "features", "--checkpoint", &s(run), "--shards", &s(&val), "--out", &s(&feats), "--no-progress"]
            .map(String::from),
    );
    let bytes = std::fs::read(&feats).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (cls, mean, labels, keys) = (
        st.tensor("cls").unwrap(),
        st.tensor("mean").unwrap(),
        st.tensor("labels").unwrap(),
        st.tensor("keys").unwrap(),
    );
    assert_eq!(cls.shape(), &[24, 64]);
    assert_eq!(mean.shape(), &[24, 64]);
    assert_eq!(labels.shape(), &[24]);
    assert_eq!(keys.shape()[0], 24);
    // Keys and labels are those of the shards, in shard order.
    let want: Vec<(String, i64)> = cae_tests::all_samples(&val)
        .into_iter()
        .map(|(_, smp)| (smp.key.clone(), smp.class().unwrap().unwrap()))
        .collect();
    let got_labels: Vec<i64> =
        labels.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let w = keys.shape()[1];
    let got_keys: Vec<String> = keys
        .data()
        .chunks_exact(w)
        .map(|r| String::from_utf8(r.iter().copied().take_while(|&b| b != 0).collect()).unwrap())
        .collect();
    assert_eq!(got_keys.into_iter().zip(got_labels).collect::<Vec<_>>(), want);
    // The features are finite and not constant.
    let row0: Vec<f32> =
        cls.data()[..64 * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(row0.iter().all(|v| v.is_finite()) && row0.iter().any(|&v| v != row0[0]));

    let knn = |extra: &[&str]| -> serde_json::Value {
        let mut a: Vec<String> = ["trainer", "eval", "knn", "--checkpoint", &s(run), "--train-shards", &s(train)]
            .into_iter()
            .map(String::from)
            .collect();
        a.extend(["--val-shards", &s(&val), "--json", "--no-progress"].map(String::from));
        a.extend(extra.iter().map(|x| x.to_string()));
        let out = run_ok(&a);
        let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in:\n{out}"));
        serde_json::from_str(line).unwrap()
    };
    let trained = knn(&[]);
    let random = knn(&["--random-init"]);
    eprintln!("k-NN trained {trained}\nk-NN random init {random}");
    for r in [&trained, &random] {
        for f in ["cls", "mean"] {
            let (t1, t5) = (r[f]["top1"].as_f64().unwrap(), r[f]["top5"].as_f64().unwrap());
            assert!((0.0..=1.0).contains(&t1) && t1 <= t5 && t5 <= 1.0, "{r}");
            assert_eq!((r[f]["train_samples"].as_u64(), r[f]["val_samples"].as_u64()), (Some(64), Some(24)));
            assert_eq!((r[f]["k"].as_u64(), r[f]["classes"].as_u64()), (Some(20), Some(4)));
        }
    }
    assert!(random["encoder"].as_str().unwrap().starts_with("random init"), "{random}");
    // The classes differ in palette and wave orientation: mean-pooled features of the trained
    // encoder separate them far above chance (1/4).
    assert!(trained["mean"]["top1"].as_f64().unwrap() > 0.4, "{trained}");
}

/// `trainer run --init-from` an mmselfsup checkpoint (the micro golden file of
/// tools/py/make_mmselfsup_golden.py), `trainer features` straight from an extracted mmselfsup
/// backbone, and a clear refusal when the file does not fit the run's model.
#[test]
fn mmselfsup_checkpoints_feed_run_features_and_export() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/golden");
    let full = golden.join("cae_mmselfsup_micro_legacy.pth").to_string_lossy().into_owned();
    let backbone = golden.join("cae_mmselfsup_micro_backbone_legacy.pth").to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 2, 8);
    let s = |p: &Path| p.to_string_lossy().into_owned();

    let run = tmp.path().join("run");
    let mut a = run_args(&data, &run, 2, 0);
    a.extend(
        ["--init-from", &full, "--set", "model.target=dalle", "--set", "tokenizer.random_init=true"].map(String::from),
    );
    let out = run_ok(&a);
    assert!(out.contains("initial weights:") && out.contains("mmselfsup full checkpoint"), "{out}");
    assert_eq!(read_step_log(&run.join(STEP_LOG)).unwrap().len(), 2);

    // The pixels target has another head ([768, 64], not the file's [512, 64]): refused, naming
    // the file and the tensor.
    let mut a = run_args(&data, &tmp.path().join("run2"), 2, 0);
    a.extend(["--init-from", &full].map(String::from));
    let o = spawn(&a, &[]).wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("cae_mmselfsup_micro_legacy.pth") && text.contains("decoder.head"), "{text}");

    let feats = tmp.path().join("f.safetensors");
    run_ok(
        &[
            "trainer",
            "features",
            "--checkpoint",
            &backbone,
            "--shards",
            &s(&data),
            "--out",
            &s(&feats),
            "--no-progress",
        ]
        .map(String::from),
    );
    let bytes = std::fs::read(&feats).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("cls").unwrap().shape(), &[16, 64]);

    // Conversion to timm names: the k part of qkv.bias is zero, and the file is complete.
    let timm = tmp.path().join("timm.safetensors");
    run_ok(&["trainer", "export", "--checkpoint", &backbone, "--format", "timm", "--out", &s(&timm)].map(String::from));
    let bytes = std::fs::read(&timm).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let qkv_b = st.tensor("blocks.1.attn.qkv.bias").unwrap();
    assert_eq!(qkv_b.shape(), &[192]);
    assert!(qkv_b.data()[64 * 4..128 * 4].iter().all(|&b| b == 0));
    assert!(qkv_b.data()[..64 * 4].iter().any(|&b| b != 0), "q bias comes from the file");
    assert_eq!(st.len(), 4 + 2 * 14 + 2); // patch w/b, cls, pos; 14 per block; final norm
}
