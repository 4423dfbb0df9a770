//! `--shards` given something that is not shards (issue 27): the error says what it looks like
//! and what to pass instead, end to end through the `pipeline` binary.

use std::process::Command;

fn bench_error(shards: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["bench", "--batches", "1", "--batch-size", "2", "--shards", shards])
        .output()
        .unwrap();
    assert!(!out.status.success(), "bench on {shards} must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_image_folder_or_a_glob_as_shards_gets_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("train");
    std::fs::create_dir_all(images.join("n01440764")).unwrap();
    std::fs::write(images.join("n01440764").join("n01440764_18.JPEG"), b"jpeg bytes").unwrap();
    let e = bench_error(&images.to_string_lossy());
    assert!(e.contains("image folder") && e.contains(&format!("sharder build --input {}", images.display())), "{e}");

    let shards = tmp.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for i in 0..3 {
        std::fs::write(shards.join(format!("val-{i:06}.tar")), b"").unwrap();
    }
    let e = bench_error(&shards.join("val-*.tar").to_string_lossy());
    assert!(e.contains("glob") && e.contains("brace pattern"), "{e}");
    let e = bench_error(&shards.to_string_lossy());
    assert!(e.contains(&shards.join("val-{000000..000002}.tar").display().to_string()), "{e}");
}
