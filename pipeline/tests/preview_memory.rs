//! The decode memory bound, end to end through the `pipeline` binary: a shard holding four
//! 1 KiB JPEGs whose headers claim 16384x16384 once made `pipeline preview` peak at 1.6 GiB
//! (each worker allocated and zeroed 805 MiB). Now such a header is refused before anything is
//! allocated, so the peak stays within 100 MiB of the same shard without them.

use std::path::Path;
use std::process::{Command, Stdio};

use cae_pipeline::wds::ShardWriter;

fn jpeg(w: u16, h: u16, seed: u8) -> Vec<u8> {
    let rgb: Vec<u8> =
        (0..w as usize * h as usize * 3).map(|i| (i as u8).wrapping_mul(seed) ^ (i / 97) as u8).collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

/// A small JPEG whose frame header claims `side` x `side`.
fn header_claiming(side: u16) -> Vec<u8> {
    let mut b = jpeg(16, 16, 7);
    let sof = b.windows(2).position(|m| m == [0xFF, 0xC0]).expect("SOF0");
    b[sof + 5..sof + 7].copy_from_slice(&side.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&side.to_be_bytes());
    b
}

fn shard(path: &Path, bombs: usize) {
    let mut w = ShardWriter::create(path).unwrap();
    for i in 0..bombs {
        w.write_sample(&format!("bomb{i}"), &[("cls", b"0"), ("jpg", &header_claiming(16384))]).unwrap();
    }
    for i in 0..40 {
        w.write_sample(&format!("ok{i:03}"), &[("cls", b"1"), ("jpg", &jpeg(320, 240, i as u8 | 1))]).unwrap();
    }
    w.finish().unwrap();
}

/// Runs `pipeline preview` on `shard` and returns its peak RSS in bytes (wait4's rusage of
/// that child alone).
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which std's Child cannot see
fn preview_peak_rss(shard: &Path, out: &Path) -> u64 {
    let child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["preview", "--workers", "2", "--shuffle-buffer", "1", "--n", "8", "--shards"])
        .arg(shard)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "preview failed: status {status}");
    usage.ru_maxrss as u64 * 1024 // KiB on Linux
}

#[test]
fn header_only_giant_jpegs_do_not_raise_peak_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (clean, hostile) = (tmp.path().join("clean-000000.tar"), tmp.path().join("hostile-000000.tar"));
    shard(&clean, 0);
    shard(&hostile, 4);
    let base = preview_peak_rss(&clean, &tmp.path().join("clean.png"));
    let peak = preview_peak_rss(&hostile, &tmp.path().join("hostile.png"));
    eprintln!("peak RSS: clean {} MiB, with 4 giant headers {} MiB", base >> 20, peak >> 20);
    assert!(peak <= base + (100 << 20), "peak {} MiB vs clean {} MiB", peak >> 20, base >> 20);
}
