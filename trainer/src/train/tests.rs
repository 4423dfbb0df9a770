//! Tests of the step loop and run setup on the CPU backend: loss scaling, exact resume, stop and
//! non-finite handling, the tokenizer's weights, autocast, lazy host syncs.

use super::*;
use crate::weights::load_model;
use burn::backend::{Autodiff, Flex};
use std::sync::atomic::Ordering;

type AB = Autodiff<Flex>;

fn shards(dir: &Path) -> PathBuf {
    let spec = cae_tools::fixtures::FixtureSpec { classes: 2, per_class: 12, seed: 1, odd_files: false, max_side: 120 };
    let fx = cae_tools::fixtures::generate(&dir.join("img"), &spec).unwrap();
    let out = dir.join("shards");
    let mut o = cae_sharder::BuildOptions::new(&fx.train_dir, &out);
    o.shard_max_samples = 10;
    o.workers = 1;
    cae_sharder::build(&o).unwrap();
    out
}

fn opts(run_dir: PathBuf, shards: &Path, resume: Option<PathBuf>) -> RunOptions {
    RunOptions { run_dir, shards: shards.to_string_lossy().into_owned(), resume, ..RunOptions::default() }
}

/// 8 steps of micro (pixels target) from the weights of `init` (so that runs compared with
/// each other start from the same weights even while other tests use burn's global RNG).
fn precision_run(tmp: &Path, data: &Path, init: &Path, name: &str, extra: &[&str]) -> Vec<StepLog> {
    let mut sets: Vec<String> = [
        "model.target=\"pixels\"",
        "data.batch_size=4",
        "data.workers=1",
        "data.shuffle_buffer=8",
        "schedule.total_steps=8",
        "checkpoint.every=4",
    ]
    .map(String::from)
    .to_vec();
    sets.extend(extra.iter().map(|s| s.to_string()));
    let config = RunConfig::resolve(None, &sets).unwrap();
    let dir = tmp.join(name);
    let mut o = opts(dir.clone(), data, None);
    o.init_from = Some(init.to_path_buf());
    run::<AB>(&config, &o, &Default::default()).unwrap();
    read_step_log(&dir.join(STEP_LOG)).unwrap()
}

/// Dynamic loss scaling multiplies the loss by a power of two and divides the gradients by
/// it: in f32 both are exact, so the losses and gradient norms equal the unscaled run's bit
/// for bit (the scaler's wiring changes nothing but the scale). A scale that overflows f32
/// skips steps (no update, grad_norm null in the log) and halves until training goes on.
#[test]
fn loss_scaling_is_exact_in_f32_and_skips_overflowing_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    // The common initial weights: a 1-step run's checkpoint.
    let sets: Vec<String> =
        ["model.target=\"pixels\"", "data.batch_size=4", "data.workers=1", "schedule.total_steps=1"]
            .map(String::from)
            .to_vec();
    let init_dir = tmp.path().join("init");
    run::<AB>(&RunConfig::resolve(None, &sets).unwrap(), &opts(init_dir.clone(), &data, None), &Default::default())
        .unwrap();
    let init = checkpoint::locate(&init_dir).unwrap();
    let plain = precision_run(tmp.path(), &data, &init, "plain", &[]);
    let scaled = precision_run(
        tmp.path(),
        &data,
        &init,
        "scaled",
        &["precision.loss_scaling=\"dynamic\"", "precision.init_scale=1024.0", "precision.growth_interval=3"],
    );
    let key = |s: &StepLog| (s.step, s.loss.to_bits(), s.grad_norm.to_bits());
    assert_eq!(plain.iter().map(key).collect::<Vec<_>>(), scaled.iter().map(key).collect::<Vec<_>>());
    // The scaler state is in the checkpoint: 8 good steps with growth every 3 -> 1024 * 4.
    let ck = Checkpoint::read(&tmp.path().join("scaled/checkpoints").join(checkpoint::file_name(8))).unwrap();
    let sc = ck.header.loss_scaler.expect("scaler state saved");
    assert_eq!((sc.scale, sc.good_steps), (4096.0, 2));

    // 2^130 is infinite in f32: the first steps overflow and are skipped until 2^127 > scale
    // x (gradient) stops overflowing.
    let over = precision_run(
        tmp.path(),
        &data,
        &init,
        "overflow",
        &["precision.loss_scaling=\"dynamic\"", "precision.init_scale=1.361129467683754e39"],
    );
    assert_eq!(over.len(), 8);
    let skipped = over.iter().take_while(|s| s.grad_norm.is_nan()).count();
    assert!((1..8).contains(&skipped), "skipped {skipped}: {over:?}");
    assert!(over[skipped..].iter().all(|s| s.grad_norm.is_finite() && s.loss.is_finite()));
    // Skipped steps still count: the lr schedule advances through them (as with GradScaler).
    assert_eq!(over[7].lr.to_bits(), plain[7].lr.to_bits());
}

/// Dalle target with the random micro tokenizer (saved in the checkpoint) and gradient
/// accumulation over 2 micro-batches: resuming at step 3 reproduces steps 4..6 exactly.
#[test]
fn resume_with_tokenizer_and_accumulation_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let sets: Vec<String> = [
        "model.target=\"dalle\"",
        "tokenizer.random_init=true",
        "data.batch_size=4",
        "data.workers=1",
        "data.shuffle_buffer=8",
        "optimizer.accumulation_steps=2",
        "schedule.total_steps=6",
        "checkpoint.every=3",
    ]
    .map(String::from)
    .to_vec();
    let config = RunConfig::resolve(None, &sets).unwrap();
    assert_eq!(config.total_batch(), 8);
    let dev = Default::default();
    let a = tmp.path().join("a");
    let sa = run::<AB>(&config, &opts(a.clone(), &data, None), &dev).unwrap();
    assert_eq!((sa.start_step, sa.end_step), (0, 6));
    let full = read_step_log(&a.join(STEP_LOG)).unwrap();
    assert_eq!(full.len(), 6);
    assert_eq!(full[0].lr, 0.0);
    // Initial CE of a random head over 512 tokens is about ln 512 (spec §7 B).
    let ln512 = (512f64).ln();
    assert!((full[0].loss_main - ln512).abs() < 0.5, "initial CE {} vs ln 512 = {ln512}", full[0].loss_main);

    // Resume from the step-3 checkpoint into a fresh run dir (log lines 1..3 copied).
    let b = tmp.path().join("b");
    fs::create_dir_all(&b).unwrap();
    let ck3 = a.join(checkpoint::CHECKPOINT_DIR).join(checkpoint::file_name(3));
    assert!(ck3.is_file());
    let head: String =
        fs::read_to_string(a.join(STEP_LOG)).unwrap().lines().take(3).map(|l| format!("{l}\n")).collect();
    fs::write(b.join(STEP_LOG), head).unwrap();
    let ck = Checkpoint::read(&ck3).unwrap();
    assert!(ck.has("tokenizer") && ck.has("model") && ck.has("optimizer"));
    let resumed_config = RunConfig::from_resolved_toml(&ck.header.config).unwrap();
    assert_eq!(resumed_config, config);
    let sb = run::<AB>(&resumed_config, &opts(b.clone(), &data, Some(ck3)), &dev).unwrap();
    assert_eq!((sb.start_step, sb.end_step), (3, 6));
    let resumed = read_step_log(&b.join(STEP_LOG)).unwrap();
    let key =
        |s: &StepLog| (s.step, s.loss.to_bits(), s.loss_main.to_bits(), s.loss_align.to_bits(), s.grad_norm.to_bits());
    assert_eq!(resumed.iter().map(key).collect::<Vec<_>>(), full.iter().map(key).collect::<Vec<_>>());
    let (ma, _, _) = load_model::<Flex>(&checkpoint::locate(&a).unwrap(), &dev).unwrap();
    let (mb, _, step) = load_model::<Flex>(&checkpoint::locate(&b).unwrap(), &dev).unwrap();
    assert_eq!(step, 6);
    assert_eq!(ma.encoder.cls_token.val().into_data(), mb.encoder.cls_token.val().into_data());
}

#[test]
fn stop_flag_checkpoints_after_the_current_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let config = RunConfig::resolve(
        None,
        &["data.batch_size=4", "data.workers=1", "schedule.total_steps=50", "checkpoint.every=0"].map(String::from),
    )
    .unwrap();
    let o = opts(tmp.path().join("run"), &data, None);
    o.stop.store(true, Ordering::SeqCst); // as if SIGTERM arrived during step 1
    let s = run::<AB>(&config, &o, &Default::default()).unwrap();
    assert_eq!(s.end_step, 1);
    assert!(s.interrupted);
    let ck = Checkpoint::read(s.last_checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(ck.header.step, 1);
    let loader = ck.header.loader;
    assert_eq!((loader.epoch, loader.batch, loader.consumed), (0, 1, 4));
    assert!(loader.fingerprint.is_some(), "the state says what it refers to");
}

#[test]
fn non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    // An absurd learning rate blows the weights up within a few steps.
    let config = RunConfig::resolve(
        None,
        &[
            "model.target=\"pixels\"",
            "data.batch_size=4",
            "data.workers=1",
            "optimizer.lr=1e30",
            "optimizer.lr_batch=4",
            "optimizer.clip_grad_norm=0.0",
            "schedule.total_steps=20",
            "schedule.warmup_steps=1",
            "checkpoint.every=1",
            "checkpoint.keep_last=2",
        ]
        .map(String::from),
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    let err = run::<AB>(&config, &opts(run_dir.clone(), &data, None), &Default::default()).unwrap_err();
    let CaeError::NonFinite { step, value, what } = err else { panic!("expected NonFinite, got {err}") };
    assert!(!value.is_finite(), "{what}");
    assert!((2..=20).contains(&step), "step {step}");
    // The newest checkpoint is the step before, and it holds finite weights.
    let latest = checkpoint::locate(&run_dir).unwrap();
    let ck = Checkpoint::read(&latest).unwrap();
    assert_eq!(ck.header.step, step - 1);
    assert!(ck.header.loss.is_some_and(f64::is_finite));
    let (model, _, _) = load_model::<Flex>(&latest, &Default::default()).unwrap();
    assert!(all_finite(&model), "a checkpoint never holds non-finite weights");
    let log = read_step_log(&run_dir.join(STEP_LOG)).unwrap();
    assert!(log.len() as u64 >= step - 1, "every completed step is logged");
}

/// The dalle target with tokenizer weights from a file (the golden micro DALL-E `.pth`):
/// the run loads them, trains, and does not copy them into its checkpoints.
#[test]
fn dalle_weights_file_feeds_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dalle_micro.pth");
    let sets = vec![
        "model.target=\"dalle\"".to_string(),
        "tokenizer.random_init=false".into(),
        format!("tokenizer.weights={:?}", pth.to_string_lossy()),
        "data.batch_size=4".into(),
        "data.workers=1".into(),
        "schedule.total_steps=3".into(),
    ];
    let config = RunConfig::resolve(None, &sets).unwrap();
    let run_dir = tmp.path().join("run");
    let s = run::<AB>(&config, &opts(run_dir.clone(), &data, None), &Default::default()).unwrap();
    assert_eq!(s.end_step, 3);
    let log = read_step_log(&run_dir.join(STEP_LOG)).unwrap();
    assert!((log[0].loss_main - (512f64).ln()).abs() < 0.5, "initial CE {}", log[0].loss_main);
    let ck = Checkpoint::read(&checkpoint::locate(&run_dir).unwrap()).unwrap();
    assert!(ck.has("model") && !ck.has("tokenizer"));
    let missing =
        RunConfig::resolve(None, &[sets[0].clone(), sets[1].clone(), "tokenizer.weights=\"/nonexistent.pth\"".into()])
            .unwrap();
    let e = run::<AB>(&missing, &opts(tmp.path().join("r2"), &data, None), &Default::default()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent.pth"), "{e}");
}
/// Mixed precision trains (issue: AMP semantics): 200 micro steps from the same weights in
/// f32, bf16 autocast and f16 autocast with dynamic loss scaling; no NaN, and the mean loss
/// over the last 10 % of steps within 5 % of f32's.
#[test]
fn bf16_and_f16_autocast_train_like_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let sets = |dtype: &str| -> Vec<String> {
        [
            "model.target=\"pixels\"",
            "data.batch_size=8",
            "data.workers=1",
            "data.shuffle_buffer=8",
            "schedule.total_steps=200",
            "checkpoint.every=0",
            "log_every=50",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("precision.dtype=\"{dtype}\"")])
        .collect()
    };
    let late_mean = |dtype: &str| {
        let config = RunConfig::resolve(None, &sets(dtype)).unwrap();
        let dir = tmp.path().join(dtype);
        let s = run::<AB>(&config, &opts(dir.clone(), &data, None), &Default::default()).unwrap();
        assert_eq!(s.end_step, 200);
        let log = read_step_log(&dir.join(STEP_LOG)).unwrap();
        assert_eq!(log.len(), 200);
        assert!(log.iter().all(|l| l.loss.is_finite()), "{dtype}: a non-finite loss");
        let late: Vec<f64> = log[180..].iter().map(|l| l.loss).collect();
        (log[0].loss, late.iter().sum::<f64>() / late.len() as f64)
    };
    let (f32_first, f32_late) = late_mean("f32");
    assert!(f32_late < 0.8 * f32_first, "f32 trains: {f32_first} -> {f32_late}");
    for dtype in ["bf16", "f16"] {
        let (first, late) = late_mean(dtype);
        assert!(((first - f32_first) / f32_first).abs() < 0.05, "{dtype} first loss {first} vs {f32_first}");
        assert!(((late - f32_late) / f32_late).abs() < 0.05, "{dtype} late mean {late} vs f32 {f32_late}");
    }
}

/// At most one host sync per step (a checkpoint step adds the weights' finiteness check):
/// none between log steps in f32 (the values are read once per `log_every` steps, all in
/// one read), one per step with f16 loss scaling.
#[test]
fn host_syncs_are_lazy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let run_with = |name: &str, extra: &str| {
        let sets: Vec<String> = [
            "model.target=\"pixels\"",
            "data.batch_size=4",
            "data.workers=1",
            "schedule.total_steps=12",
            "checkpoint.every=0",
            "log_every=5",
            extra,
        ]
        .map(String::from)
        .to_vec();
        let dir = tmp.path().join(name);
        run::<AB>(&RunConfig::resolve(None, &sets).unwrap(), &opts(dir.clone(), &data, None), &Default::default())
            .unwrap();
        read_step_log(&dir.join(STEP_LOG)).unwrap().iter().map(|l| l.host_syncs).collect::<Vec<u64>>()
    };
    // Reads at step 1 (the first line), 5, 10 and 12 (the end, with the checkpoint).
    let f32_syncs = run_with("f32", "precision.dtype=\"f32\"");
    assert_eq!(f32_syncs, vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1]);
    // f16: GradScaler's read every step; the last step's checkpoint adds its weight check.
    let f16_syncs = run_with("f16", "precision.dtype=\"f16\"");
    assert_eq!(f16_syncs, [vec![1; 11], vec![2]].concat());
}

/// Regression: `absolute_source` split at every `::`, so an IPv6 URL (`[::1]`) became local
/// paths (`/cwd/1]:8080/x.tar`) in the run record.
#[test]
fn absolute_source_keeps_ipv6_urls_whole() {
    let src = "http://[::1]:8080/x-{0..3}.tar::rel/y.tar";
    let got = absolute_source(src);
    let want = format!("http://[::1]:8080/x-{{0..3}}.tar::{}", std::path::absolute("rel/y.tar").unwrap().display());
    assert_eq!(got, want);
}
