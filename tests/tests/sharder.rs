//! End-to-end tests of `sharder build` / `sharder verify` on the generated ImageNet-like set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cae_sharder::build::{CRASH_ENV, HANG_ENV};
use cae_sharder::{BuildOptions, Validate, build, verify};
use cae_tests::{all_samples, dir_bytes};
use cae_tools::fixtures::{FixtureSpec, Fixtures, OddKind, generate};

fn fixtures(dir: &Path, classes: usize, per_class: usize) -> Fixtures {
    generate(dir, &FixtureSpec { classes, per_class, seed: 3, odd_files: true, max_side: 700 }).expect("fixtures")
}

fn opts(input: &Path, output: &Path) -> BuildOptions {
    let mut o = BuildOptions::new(input, output);
    o.shard_max_samples = 7;
    o.workers = 2;
    o
}

fn json_meta(s: &cae_pipeline::wds::ShardSample) -> serde_json::Value {
    serde_json::from_slice(s.get("json").expect("json member")).expect("valid json")
}

#[test]
fn hostile_files_get_their_outcome_and_counts_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 3, 5);
    let out = tmp.path().join("out");
    let r = build(&opts(&fx.train_dir, &out)).expect("build");

    // input files = sharded + rejected, always
    assert_eq!(r.input_files, fx.files.len() as u64);
    assert_eq!(r.samples + r.rejected, r.input_files);

    // exactly the broken files are rejected, each with a reason
    let tsv = std::fs::read_to_string(out.join("rejected.tsv")).unwrap();
    let rejected: HashMap<&str, &str> = tsv.lines().skip(1).filter_map(|l| l.split_once('\t')).collect();
    let expect_rejected = [OddKind::Truncated, OddKind::Empty, OddKind::NotAnImage];
    assert_eq!(rejected.len(), expect_rejected.len(), "{tsv}");
    for k in expect_rejected {
        let f = fx.odd(k).unwrap();
        assert!(rejected.get(f.rel_path.as_str()).is_some_and(|r| !r.is_empty()), "{k} not rejected: {tsv}");
    }
    assert_eq!(r.rejected, 3);

    let samples = all_samples(&out);
    assert_eq!(samples.len() as u64, r.samples);
    let by_path: HashMap<String, &cae_pipeline::wds::ShardSample> =
        samples.iter().map(|(_, s)| (json_meta(s)["path"].as_str().unwrap().to_string(), s)).collect();
    let original = |k: OddKind| std::fs::read(fx.train_dir.join(&fx.odd(k).unwrap().rel_path)).unwrap();
    for (kind, action) in [
        (OddKind::Grayscale, "kept"),
        (OddKind::Progressive, "kept"),
        (OddKind::RestartMarkers, "kept"),
        (OddKind::Cmyk, "converted"),
        (OddKind::PngNamedJpeg, "converted"),
        (OddKind::ExifOrientation, "converted"),
    ] {
        let f = fx.odd(kind).unwrap();
        let s = by_path.get(&f.rel_path).unwrap_or_else(|| panic!("{kind} missing from shards"));
        let meta = json_meta(s);
        assert_eq!(meta["action"], action, "{kind}: {meta}");
        let jpg = s.get("jpg").unwrap();
        if action == "kept" {
            assert_eq!(jpg, original(kind).as_slice(), "{kind}: kept bytes must be untouched");
        } else {
            let info = cae_pipeline::decode::probe_jpeg(jpg).expect("converted output is a JPEG");
            assert!(!info.is_cmyk() && !info.progressive && info.orientation == 1, "{kind}: {info:?}");
            cae_pipeline::decode::decode_jpeg(jpg, true).expect("converted output decodes");
        }
        // class index matches the folder
        let class = s.class().unwrap().unwrap() as usize;
        assert_eq!(meta["class"], f.class);
        assert_eq!(
            std::fs::read_to_string(out.join("classes.txt")).unwrap().lines().nth(class),
            Some(f.class.as_str())
        );
    }
    // EXIF orientation 6 is applied: stored width/height swap
    let exif = fx.odd(OddKind::ExifOrientation).unwrap();
    let meta = json_meta(by_path[&exif.rel_path]);
    assert_eq!(
        (meta["width"].as_u64().unwrap(), meta["height"].as_u64().unwrap()),
        (exif.height as u64, exif.width as u64)
    );
    // every ordinary image kept byte for byte, and every sample has jpg, cls and json
    for f in fx.files.iter().filter(|f| f.odd.is_none()) {
        let s = by_path[&f.rel_path];
        assert_eq!(s.get("jpg").unwrap(), std::fs::read(fx.train_dir.join(&f.rel_path)).unwrap().as_slice());
    }
    // keys are the file stems, unique, without dots
    let mut keys: Vec<&str> = samples.iter().map(|(_, s)| s.key.as_str()).collect();
    assert!(keys.iter().all(|k| !k.contains('.')));
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), samples.len());
    // globally shuffled: the first shard mixes classes
    let first_shard_classes: std::collections::HashSet<i64> =
        samples.iter().filter(|(n, _)| n == "train-000000.tar").map(|(_, s)| s.class().unwrap().unwrap()).collect();
    assert!(first_shard_classes.len() > 1);
    assert!(verify(&out, true, false).unwrap().ok());
}

#[test]
fn same_seed_gives_identical_shards_whatever_the_worker_count() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 3, 6);
    let mut a = opts(&fx.train_dir, &tmp.path().join("a"));
    a.workers = 1;
    let mut b = opts(&fx.train_dir, &tmp.path().join("b"));
    b.workers = 2;
    build(&a).unwrap();
    build(&b).unwrap();
    let (da, db) = (dir_bytes(&a.output), dir_bytes(&b.output));
    assert!(da.keys().filter(|n| n.ends_with(".tar")).count() >= 3);
    assert_eq!(da, db, "same input and seed must give byte-identical output");

    let mut c = opts(&fx.train_dir, &tmp.path().join("c"));
    c.seed = 99;
    build(&c).unwrap();
    assert_ne!(da.get("train-000000.tar"), dir_bytes(&c.output).get("train-000000.tar"), "seed must change the order");
}

#[test]
fn shard_byte_limit_is_respected() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 6);
    let mut o = opts(&fx.train_dir, &tmp.path().join("o"));
    o.shard_max_samples = 1000;
    o.shard_max_bytes = 200_000;
    let r = build(&o).unwrap();
    let m = cae_pipeline::manifest::Manifest::load(&o.output).unwrap();
    assert!(r.shards >= 2);
    for s in &m.shards {
        // a single over-sized sample may exceed the limit alone; otherwise stay under it
        assert!(s.digest.bytes <= 200_000 || s.digest.samples == 1, "{s:?}");
    }
}

#[test]
fn existing_output_needs_resume_or_force() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 2);
    let out = tmp.path().join("out");
    build(&opts(&fx.train_dir, &out)).unwrap();
    let err = build(&opts(&fx.train_dir, &out)).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    let mut f = opts(&fx.train_dir, &out);
    f.force = true;
    build(&f).unwrap();
    let mut r = opts(&fx.train_dir, &out);
    r.resume = true;
    let report = build(&r).unwrap();
    assert_eq!(report.files_processed, 0, "a finished build is recognised as complete");
}

#[test]
fn header_validation_also_rejects_the_broken_files() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 3, 2);
    let mut o = opts(&fx.train_dir, &tmp.path().join("o"));
    o.validate = Validate::Header;
    let r = build(&o).unwrap();
    assert_eq!(r.rejected, 3);
    assert_eq!(r.samples + r.rejected, fx.files.len() as u64);
}

#[test]
fn max_side_resizes_large_images() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 8);
    let mut o = opts(&fx.train_dir, &tmp.path().join("o"));
    o.max_side = Some(200);
    build(&o).unwrap();
    let mut resized = 0;
    for (_, s) in all_samples(&o.output) {
        let meta = json_meta(&s);
        let (w, h) = (meta["width"].as_u64().unwrap(), meta["height"].as_u64().unwrap());
        assert!(w.max(h) <= 200, "{meta}");
        let info = cae_pipeline::decode::probe_jpeg(s.get("jpg").unwrap()).unwrap();
        assert_eq!((info.width as u64, info.height as u64), (w, h));
        resized += (meta["action"] == "resized") as usize;
    }
    assert!(resized > 0);
}

#[test]
fn verify_catches_a_flipped_byte_and_a_truncated_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 5);
    let out = tmp.path().join("out");
    build(&opts(&fx.train_dir, &out)).unwrap();
    let clean = verify(&out, true, false).unwrap();
    assert!(clean.ok(), "{:?}", clean.problems);

    let shard0 = out.join("train-000000.tar");
    let good = std::fs::read(&shard0).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&shard0, &bad).unwrap();
    let r = verify(&out, false, false).unwrap();
    assert!(!r.ok());
    assert_eq!(r.problems[0].shard, "train-000000.tar");
    assert!(r.problems[0].message.contains("sha256"), "{}", r.problems[0]);
    std::fs::write(&shard0, &good).unwrap();

    let shard1 = out.join("train-000001.tar");
    let len = std::fs::metadata(&shard1).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&shard1).unwrap().set_len(len / 3).unwrap();
    let r = verify(&out, false, false).unwrap();
    assert!(!r.ok());
    assert!(r.problems.iter().all(|p| p.shard == "train-000001.tar" || p.shard == "manifest.json"), "{:?}", r.problems);
    assert!(r.problems.iter().any(|p| p.message.contains("samples")), "{:?}", r.problems);
}

/// Runs in a child process (re-executed test binary): builds with the crash/hang hook set.
#[test]
#[ignore = "helper: run by the crash tests in a child process"]
fn child_build() {
    let (Ok(input), Ok(output)) = (std::env::var("CHILD_INPUT"), std::env::var("CHILD_OUTPUT")) else { return };
    let mut o = opts(Path::new(&input), Path::new(&output));
    o.resume = true;
    build(&o).expect("child build");
}

fn spawn_child(input: &Path, output: &Path, hook: (&str, &str)) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_build", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("CHILD_INPUT", input)
        .env("CHILD_OUTPUT", output)
        .env(hook.0, hook.1)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child")
}

fn assert_resume_equals_uninterrupted(input: &Path, interrupted: &Path, reference: &Path) {
    let files = dir_bytes(interrupted);
    assert!(!files.contains_key("manifest.json"), "an interrupted run has no manifest");
    assert!(files.keys().any(|n| n.ends_with(".tmp")), "the torn shard is a temporary file: {:?}", files.keys());
    let complete = files.keys().filter(|n| n.ends_with(".tar")).count();
    assert!(complete >= 2, "expected complete shards before the crash, found {complete}");
    let mut r = opts(input, interrupted);
    r.resume = true;
    let report = build(&r).expect("resume");
    assert_eq!(report.kept.shards as usize, complete);
    build(&opts(input, reference)).unwrap();
    let (a, b) = (dir_bytes(interrupted), dir_bytes(reference));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a == b, "resumed output differs from the uninterrupted one");
}

#[test]
fn resume_after_abort_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 3, 6);
    let out = tmp.path().join("crashed");
    let status = spawn_child(&fx.train_dir, &out, (CRASH_ENV, "2")).wait_with_output().unwrap();
    assert!(!status.status.success(), "the child must die");
    assert_resume_equals_uninterrupted(&fx.train_dir, &out, &tmp.path().join("reference"));
}

#[test]
fn resume_after_kill_9_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 3, 6);
    let out = tmp.path().join("killed");
    let mut child = spawn_child(&fx.train_dir, &out, (HANG_ENV, "3"));
    // Wait until the child says it is paused in the middle of a shard, then SIGKILL it.
    let mut stderr = child.stderr.take().unwrap();
    let waiter = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&buf).contains("sharder: paused") {
                return true;
            }
        }
        false
    });
    let start = Instant::now();
    while !waiter.is_finished() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("kill -9"); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(waiter.join().unwrap(), "child never reached the pause point");
    assert_resume_equals_uninterrupted(&fx.train_dir, &out, &tmp.path().join("reference"));
}

#[test]
fn list_file_input_like_imagenet_val() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 3);
    // flatten: the list names files relative to the train dir, with class names
    let list: PathBuf = tmp.path().join("val.tsv");
    let rows: String =
        fx.files.iter().filter(|f| f.odd.is_none()).map(|f| format!("{}\t{}\n", f.rel_path, f.class)).collect();
    std::fs::write(&list, rows).unwrap();
    let mut o = opts(&fx.train_dir, &tmp.path().join("o"));
    o.list = Some(list);
    o.prefix = "val".into();
    let r = build(&o).unwrap();
    assert_eq!(r.samples, 6);
    assert_eq!(r.rejected, 0);
    assert!(o.output.join("val-000000.tar").exists());
}

/// Regression: manifest (and journal) shard names were joined to the output folder unchecked, so
/// `/etc/passwd` or `../x.tar` pointed outside it. Now every reader refuses them by name.
#[test]
fn manifest_and_journal_shard_names_outside_the_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 3);
    let out = tmp.path().join("out");
    build(&opts(&fx.train_dir, &out)).unwrap();
    let manifest_path = out.join("manifest.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    for bad in ["/etc/passwd", "../outside.tar"] {
        let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
        m["shards"][0]["name"] = serde_json::Value::String(bad.into());
        std::fs::write(&manifest_path, serde_json::to_string(&m).unwrap()).unwrap();
        let e = verify(&out, false, false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(bad) && e.contains("refused"), "verify: {e:?}");
        let e = cae_pipeline::source::expand(out.to_str().unwrap()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(bad) && e.contains("refused"), "loader source: {e:?}");
    }
    // An interrupted run's journal naming a shard outside the folder: resume refuses it.
    std::fs::remove_file(&manifest_path).unwrap();
    // The plan file holds the finished build's journal header line.
    let plan = std::fs::read_to_string(out.join(cae_sharder::build::PLAN_FILE)).unwrap();
    let m: serde_json::Value = serde_json::from_str(&original).unwrap();
    let mut shard = m["shards"][0].clone();
    shard["name"] = serde_json::Value::String("../outside.tar".into());
    let header = plan.trim();
    let line = serde_json::json!({ "shard": shard, "next_input": 1, "converted": 0, "rejected": [] });
    std::fs::write(out.join(cae_sharder::build::JOURNAL_FILE), format!("{header}\n{line}\n")).unwrap();
    let mut r = opts(&fx.train_dir, &out);
    r.resume = true;
    let e = build(&r).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("../outside.tar") && e.contains("refused"), "resume: {e:?}");
}

/// `--strict` with a rejected input leaves no manifest (rejected.tsv says why) and holds on
/// `--resume`, also over a finished non-strict build; without `--strict` the resume finishes it.
#[test]
fn strict_leaves_no_manifest_and_holds_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 3);
    let out = tmp.path().join("out");
    let mut o = opts(&fx.train_dir, &out);
    o.strict = true;
    let e = build(&o).unwrap_err().to_string();
    assert!(e.contains("3 input file(s) rejected") && e.contains("--strict"), "{e}");
    assert!(!out.join("manifest.json").exists(), "a failed strict run leaves no manifest");
    assert_eq!(std::fs::read_to_string(out.join("rejected.tsv")).unwrap().lines().count(), 4);
    o.resume = true;
    assert!(build(&o).is_err(), "strict holds on resume");
    assert!(!out.join("manifest.json").exists());
    o.strict = false;
    let r = build(&o).expect("resume without --strict finishes the build");
    assert_eq!(r.rejected, 3);
    assert!(out.join("manifest.json").exists());
    o.strict = true;
    assert!(build(&o).unwrap_err().to_string().contains("--strict"), "strict over a finished build");
}

/// The resume plan covers each input's size and mtime: a file replaced in place (same name)
/// makes `--resume` refuse instead of mixing old and new bytes.
#[test]
fn resume_refuses_an_input_changed_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 3);
    let out = tmp.path().join("out");
    let mut o = opts(&fx.train_dir, &out);
    build(&o).expect("build");
    o.resume = true;
    build(&o).expect("the same input resumes (already complete)");
    let victim = fx.train_dir.join(&fx.files.iter().find(|f| f.odd.is_none()).unwrap().rel_path);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&victim, bytes).unwrap();
    let e = build(&o).unwrap_err().to_string();
    assert!(e.contains("other input or options"), "{e}");
}

/// A symlink loop in the input is one rejected entry naming the loop; the build goes on.
/// Files over `--max-file-bytes` are rejected from their size.
#[test]
fn symlink_loops_and_oversized_files_are_rejected_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures(&tmp.path().join("in"), 2, 3);
    let class_dir = fx.train_dir.join(cae_tools::fixtures::wnid(0));
    std::os::unix::fs::symlink(&class_dir, class_dir.join("loop")).unwrap();
    let big = fx.train_dir.join(cae_tools::fixtures::wnid(1)).join("big.JPEG");
    std::fs::write(&big, vec![0xffu8; 300_000]).unwrap();
    let out = tmp.path().join("out");
    let mut o = opts(&fx.train_dir, &out);
    o.max_file_bytes = 200_000;
    let r = build(&o).expect("a loop does not abort the build");
    let tsv = std::fs::read_to_string(out.join("rejected.tsv")).unwrap();
    let loop_line = tsv.lines().find(|l| l.contains("/loop\t")).unwrap_or_else(|| panic!("{tsv}"));
    assert!(loop_line.contains("symlink loop"), "{loop_line}");
    let big_line = tsv.lines().find(|l| l.contains("big.JPEG")).unwrap_or_else(|| panic!("{tsv}"));
    assert!(big_line.contains("300000 bytes, over --max-file-bytes 200000"), "{big_line}");
    assert_eq!(r.samples + r.rejected, r.input_files);
    assert_eq!(r.rejected, 5, "the 3 broken fixtures, the loop and the big file: {tsv}");
}
