//! The `sharder` binary: exit codes and messages.

use std::process::Command;

use cae_tools::fixtures::{FixtureSpec, generate};

fn sharder() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sharder"))
}

#[test]
fn strict_turns_rejections_into_failure_and_verify_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = generate(tmp.path(), &FixtureSpec { classes: 2, per_class: 2, seed: 1, odd_files: true, max_side: 300 })
        .unwrap();
    let out = tmp.path().join("shards");
    let run = |extra: &[&str]| {
        let mut c = sharder();
        c.args(["build", "--input"]).arg(&fx.train_dir).arg("--output").arg(&out).args(extra);
        c.output().unwrap()
    };
    let o = run(&["--strict"]);
    assert!(!o.status.success(), "--strict with rejected files must fail");
    assert!(String::from_utf8_lossy(&o.stderr).contains("rejected"), "{}", String::from_utf8_lossy(&o.stderr));

    let o = run(&["--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("3 rejected") && stdout.contains("images/s"), "{stdout}");

    let v = sharder().args(["verify", "--decode"]).arg(&out).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let shard = out.join("train-000000.tar");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 2000] ^= 0xFF;
    std::fs::write(&shard, bytes).unwrap();
    let v = sharder().args(["verify"]).arg(&out).output().unwrap();
    assert!(!v.status.success());
    assert!(String::from_utf8_lossy(&v.stderr).contains("train-000000.tar"));
}

#[test]
fn unreadable_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = sharder()
        .args(["build", "--input", "/nonexistent/imagenet/train", "--output"])
        .arg(tmp.path().join("o"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/imagenet/train"), "{err}");
}

/// Bad samples are warned about one line each only up to a limit, then summarised per shard;
/// rejected.tsv still lists every one.
#[test]
fn rejection_warnings_are_rate_limited_with_a_per_shard_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = generate(tmp.path(), &FixtureSpec { classes: 2, per_class: 6, seed: 1, odd_files: true, max_side: 200 })
        .unwrap();
    let class_dir = fx.train_dir.join(cae_tools::fixtures::wnid(0));
    for i in 0..40 {
        std::fs::write(class_dir.join(format!("junk_{i}.JPEG")), b"not an image").unwrap();
    }
    let out = tmp.path().join("shards");
    let o = sharder()
        .args(["build", "--shard-max-samples", "4", "--input"])
        .arg(&fx.train_dir)
        .arg("--output")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let each = err.lines().filter(|l| l.contains("rejected n0") && !l.contains("inputs rejected")).count();
    let summaries = err.lines().filter(|l| l.contains("inputs rejected (first: ")).count();
    assert_eq!(each, 10, "{err}");
    assert!(summaries >= 1, "{err}");
    let tsv = std::fs::read_to_string(out.join("rejected.tsv")).unwrap();
    assert_eq!(tsv.lines().count() - 1, 43, "every rejection is listed: {tsv}");
}
