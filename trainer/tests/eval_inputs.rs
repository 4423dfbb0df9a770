//! What `trainer eval` and `trainer features` read, end to end through the real `trainer`
//! binary: train and val class lists compared (issue 27), every sample scored or a failure naming
//! it, "N of M" with `--allow-partial`, and no shard URL secret in anything a run writes (issue 22).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cae_pipeline::wds::{SampleReader, ShardWriter};
use cae_sharder::BuildOptions;
use cae_tools::fixtures::{FixtureSpec, generate, wnid};

mod common;
use common::{args as run_args, files_under, text};

// The HTTP tests' file server.
#[allow(dead_code)]
#[path = "../../tests/tests/pipeline/http_server.rs"]
mod http_server;

const BIN: &str = env!("CARGO_BIN_EXE_trainer");

fn trainer(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RUST_LOG", "warn").output().expect("spawn trainer")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `sharder build --list <list>` (the options the binary passes): a list of `path<TAB>class`
/// rows of the fixture images of `classes`, without `--classes` unless given.
fn build_from_list(tmp: &Path, name: &str, classes: &[usize], fixed: Option<&Path>) -> PathBuf {
    let fx =
        generate(&tmp.join("img"), &FixtureSpec { classes: 3, per_class: 4, seed: 3, odd_files: false, max_side: 120 })
            .expect("fixtures");
    let rows: String = fx
        .files
        .iter()
        .filter(|f| classes.iter().any(|&c| f.class == wnid(c)))
        .map(|f| format!("{}\t{}\n", f.rel_path, f.class))
        .collect();
    let list = tmp.join(format!("{name}.tsv"));
    std::fs::write(&list, rows).unwrap();
    let out = tmp.join(name);
    let mut o = BuildOptions::new(&fx.train_dir, &out);
    o.list = Some(list);
    o.classes = fixed.map(Path::to_path_buf);
    o.prefix = name.into();
    o.workers = 1;
    o.force = true;
    cae_sharder::build(&o).expect("sharder build --list");
    out
}

fn knn(train: &Path, val: &Path, extra: &[&str]) -> Output {
    let (t, v) = (s(train), s(val));
    let mut a = vec!["eval", "knn", "--random-init", "--preset", "micro", "--train-shards", &t, "--val-shards", &v];
    a.extend(["--json", "--no-progress", "--workers", "1", "--k", "3"]);
    a.extend(extra);
    trainer(&a)
}

/// Regression (issue 27): val shards built with `--list` but without `--classes`, from a list
/// lacking one class, got their own class list (starting one class later); `eval knn` scored every
/// val label shifted by one and exited 0. Now the manifests' class lists are compared first.
#[test]
fn eval_refuses_train_and_val_shards_with_different_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let train = build_from_list(tmp.path(), "train", &[0, 1, 2], None);
    let val = build_from_list(tmp.path(), "val", &[1, 2], None); // lacks class 0
    let o = knn(&train, &val, &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "a config error:\n{t}");
    let want = format!(r#"class 0 is "{}" in the train shards but "{}" in the val shards"#, wnid(0), wnid(1));
    assert!(t.contains(&want), "the first differing class is named:\n{t}");
    assert!(t.contains("--classes"), "{t}");
    assert!(!t.contains("top1"), "nothing was scored:\n{t}");
    // The linear probe refuses the same sets.
    let (ts, vs) = (s(&train), s(&val));
    let o = trainer(&[
        "eval",
        "linear",
        "--random-init",
        "--train-shards",
        &ts,
        "--val-shards",
        &vs,
        "--no-progress",
        "--epochs",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Built with the train set's class list, the same val set is scored.
    let fixed = build_from_list(tmp.path(), "val-fixed", &[1, 2], Some(&train.join("classes.txt")));
    let o = knn(&train, &fixed, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["mean"]["val_samples"], 8, "{j}");
    assert_eq!(j["scored"]["val"]["samples"], 8, "{j}");
    assert_eq!(j["scored"]["val"]["of"], 8, "{j}");
}

fn json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in:\n{}", text(o)));
    serde_json::from_str(line).unwrap()
}

/// Rewrites shard `path` with the image of its sample `index` replaced by bytes that are no
/// image (same sample count: the manifest still fits). Returns that sample's key.
fn corrupt_one(path: &Path, index: usize) -> String {
    let samples: Vec<_> = SampleReader::new(std::fs::File::open(path).unwrap()).map(|r| r.unwrap()).collect();
    let mut w = ShardWriter::create(path).unwrap();
    for (i, smp) in samples.iter().enumerate() {
        let refs: Vec<(&str, &[u8])> = smp
            .fields
            .iter()
            .map(|(e, b)| (e.as_str(), if i == index && e == "jpg" { &b"\xFF\xD8\xFFbroken"[..] } else { &b[..] }))
            .collect();
        w.write_sample(&smp.key, &refs).unwrap();
    }
    w.finish().unwrap();
    samples[index].key.clone()
}

/// Regression (issue 22): a sample or shard that could not be read was a log warning, and the
/// result scored the rest without saying so. Now `eval knn` fails naming it, or, with
/// `--allow-partial`, its JSON says "N of M".
#[test]
fn eval_scores_every_sample_or_fails_naming_it_or_says_n_of_m() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::shards(tmp.path()); // 24 samples, 2 shards of 12
    let val = tmp.path().join("val");
    std::fs::create_dir(&val).unwrap();
    for e in std::fs::read_dir(&data).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), val.join(e.file_name())).unwrap();
    }
    let key = corrupt_one(&val.join("train-000001.tar"), 3);

    let o = knn(&data, &val, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("train-000001.tar") && t.contains(&format!("sample {key}")), "names the sample:\n{t}");
    assert!(t.contains("--allow-partial"), "{t}");
    assert!(!t.contains("top1"), "nothing was scored:\n{t}");

    let o = knn(&data, &val, &["--allow-partial"]);
    assert!(o.status.success(), "{}", text(&o));
    let j = json(&o);
    let v = &j["scored"]["val"];
    assert_eq!((v["samples"].as_u64(), v["of"].as_u64(), v["bad_samples"].as_u64()), (Some(23), Some(24), Some(1)));
    assert_eq!(j["scored"]["train"]["samples"], 24, "{j}");
    assert_eq!(j["cls"]["val_samples"], 23, "{j}");
    assert!(text(&o).contains("23 of 24 samples"), "{}", text(&o));
}

fn assert_no_secret(what: &str, bytes: &[u8]) {
    let found = bytes.windows(6).any(|w| w == b"SECRET");
    assert!(!found, "{what} holds the URL's secret:\n{}", String::from_utf8_lossy(bytes));
}

/// Regression (issue 22): `ShardSpec::name()` kept a presigned URL's query string and the
/// redaction passed non-URLs through, so every bad-sample warning of a presigned shard logged
/// its signature. A run on such a shard, with a corrupt image, shows the signature nowhere:
/// not in its output, its run directory or its checkpoints, nor in `trainer features`'.
#[test]
fn a_presigned_shard_with_a_bad_sample_never_shows_its_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::shards(tmp.path());
    let served = tmp.path().join("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::copy(data.join("train-000000.tar"), served.join("x.tar")).unwrap();
    corrupt_one(&served.join("x.tar"), 2);
    let server = http_server::serve(served, Default::default());
    let url = format!(
        "http://{}/x.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASECRETKEY&X-Amz-Signature=SECRETSIG",
        server.addr
    );
    let run = tmp.path().join("run");
    let args = run_args(&url, &run, 3, &["--checkpoint-every", "1"]);
    let o = trainer(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("skipping sample") && t.contains("X-Amz-Signature=***"), "the bad sample is reported:\n{t}");
    assert_no_secret("trainer run's output", t.as_bytes());
    let files = files_under(&run);
    assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "ckpt")), "checkpoints: {files:?}");
    for f in files {
        let mut bytes = Vec::new();
        std::fs::File::open(&f).unwrap().read_to_end(&mut bytes).unwrap();
        assert_no_secret(&f.display().to_string(), &bytes);
    }

    let feats = tmp.path().join("f.safetensors");
    let o = trainer(&[
        "features",
        "--checkpoint",
        &s(&run),
        "--shards",
        &url,
        "--out",
        &s(&feats),
        "--no-progress",
        "--allow-partial",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_no_secret("trainer features' output", text(&o).as_bytes());
    assert_no_secret("the features file", &std::fs::read(&feats).unwrap());
    let o = trainer(&["features", "--checkpoint", &s(&run), "--shards", &url, "--out", &s(&feats), "--no-progress"]);
    assert!(!o.status.success(), "a bad sample without --allow-partial fails");
    assert_no_secret("trainer features' error", text(&o).as_bytes());
}
