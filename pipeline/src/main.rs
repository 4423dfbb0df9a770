//! `pipeline`: run the CAE data pipeline on its own — `bench` measures it, `preview` shows it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use cae_pipeline::{Loader, LoaderConfig, LoaderState, source};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(name = "pipeline", version, about = "CAE data pipeline: shards -> two views + masks -> batches")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct LoaderArgs {
    /// Shards: a directory with manifest.json, paths, URLs or brace patterns (join with `::`).
    #[arg(long)]
    shards: String,
    /// Decode/augment threads (default: all cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Batches kept ready ahead of the consumer.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    /// Shuffle buffer size in samples.
    #[arg(long, default_value_t = 1000)]
    shuffle_buffer: usize,
    /// Shuffle buffer bound in bytes (image and .cls members only).
    #[arg(long, default_value_t = cae_pipeline::loader::DEFAULT_SHUFFLE_BUFFER_BYTES)]
    shuffle_buffer_bytes: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl LoaderArgs {
    fn config(&self, batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            workers: self.workers.unwrap_or(0),
            prefetch: self.prefetch,
            shuffle_buffer: self.shuffle_buffer,
            shuffle_buffer_bytes: self.shuffle_buffer_bytes,
            seed: self.seed,
            ..LoaderConfig::default()
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure the pipeline alone, and zune-jpeg decode alone on the same images.
    Bench {
        #[command(flatten)]
        loader: LoaderArgs,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Batches to time (after 2 warm-up batches).
        #[arg(long, default_value_t = 20)]
        batches: usize,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Write a PNG grid: per sample the 224 view, the 112 view and the masked 224 view.
    Preview {
        #[command(flatten)]
        loader: LoaderArgs,
        #[arg(long)]
        out: PathBuf,
        /// Samples to show.
        #[arg(long, default_value_t = 8)]
        n: usize,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench { loader, batch_size, batches, json } => bench(&loader, batch_size, batches, json),
        Command::Preview { loader, out, n } => preview(&loader, &out, n),
    }
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn bench(args: &LoaderArgs, batch_size: usize, batches: usize, json: bool) -> anyhow::Result<()> {
    let shards = source::expand(&args.shards)?;
    let cfg = args.config(batch_size);
    let cfg_resume = cfg.clone();
    let cfg_http = cfg.http.clone();
    let workers = cfg.worker_count();
    let (buffer, buffer_bytes) = (cfg.shuffle_buffer, cfg.shuffle_buffer_bytes);
    let loader = Loader::new(cfg, shards.clone(), LoaderState::default())?;
    let bound = loader.in_flight_bound();
    let pb = if std::io::stderr().is_terminal() && !json {
        let pb = ProgressBar::new((batches + 2) as u64);
        pb.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} batches {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let next = || -> anyhow::Result<cae_pipeline::Batch> {
        let b = loader.next_blocking().context("the shards ran out before the benchmark finished")??;
        pb.inc(1);
        Ok(b)
    };
    for _ in 0..2 {
        next()?; // warm-up: threads started, buffers allocated, shuffle buffer filled
    }
    let s0 = snapshot(&loader);
    let t = Instant::now();
    for _ in 0..batches {
        next()?;
    }
    let secs = t.elapsed().as_secs_f64();
    let s1 = snapshot(&loader);
    pb.finish_and_clear();
    let peak_rss = peak_rss_bytes();
    let peak_in_flight = loader.stats().map.get().map_or(0, |c| c.peak_undelivered.load(Ordering::Relaxed));
    drop(loader);

    let images = (batches * batch_size) as f64;
    let done = (s1.done - s0.done).max(1) as f64;
    let ips = images / secs;
    let per_core = ips / workers as f64;
    let decode_ms = (s1.decode_ns - s0.decode_ns) as f64 / done / 1e6;
    let augment_ms = (s1.augment_ns - s0.augment_ns) as f64 / done / 1e6;
    let read_ms = (s1.read_ns - s0.read_ns) as f64 / (s1.read - s0.read).max(1) as f64 / 1e6;
    // The bytes this rate reads: images/s x the mean bytes of a sample read. (Bytes read during
    // the timed batches alone say nothing on a small set: the shuffle buffer read it all during
    // the warm-up, and "0.0 MB/s" was printed.)
    let mb_s = ips * s1.bytes as f64 / s1.read.max(1) as f64 / 1e6;
    let rows_fraction = (s1.decoded_rows - s0.decoded_rows) as f64 / (s1.image_rows - s0.image_rows).max(1) as f64;

    // Decode alone, one thread, on the images of the same shards (whatever their format): as many as the pipeline
    // delivered (so the mean image size is the same; at most 4096 held in memory at once).
    // Remote shards are fetched again into memory first: only the decoding is timed.
    let sampled = cae_pipeline::bench::sample_images(&shards, &cfg_http, (batches * batch_size).clamp(512, 4096))
        .map_err(anyhow::Error::msg)?;
    let (dec_ips, dec_n) = cae_pipeline::bench::decode_only_rate(&sampled);
    drop(sampled);
    let ratio = per_core / dec_ips;
    // Resume cost: a loader opened at 90 % of epoch 0 as a checkpoint would reopen it. Not on
    // remote shards: it would download up to `resume_shards_bound` shards again.
    let remote = shards.iter().any(cae_pipeline::source::ShardSpec::is_http);
    let resume = if remote { None } else { cae_pipeline::bench::resume_cost(&cfg_resume, &shards, 0.9)? };
    if json {
        let j = serde_json::json!({
            "images_per_second": ips,
            "images_per_second_per_core": per_core,
            "workers": workers,
            "batch_size": batch_size,
            "batches": batches,
            "seconds": secs,
            "mb_per_second": mb_s,
            "read_ms_per_image": read_ms,
            "decode_ms_per_image": decode_ms,
            "augment_ms_per_image": augment_ms,
            "decoded_rows_fraction": rows_fraction,
            "decode_only_images_per_second": dec_ips,
            "decode_only_images": dec_n,
            "ratio_to_decode_only": ratio,
            "bad_samples": s1.bad,
            "peak_rss_bytes": peak_rss,
            "in_flight_bound": bound,
            "in_flight_peak": peak_in_flight,
            "shuffle_buffer": buffer,
            "shuffle_buffer_bytes": buffer_bytes,
            "resume_at_batch": resume.as_ref().map(|r| r.at_batch),
            "batches_per_epoch": resume.as_ref().map(|r| r.batches_per_epoch),
            "resume_shards_read": resume.as_ref().map(|r| r.shards_read),
            "resume_shards_bound": resume.as_ref().map(|r| r.shards_bound),
            "resume_seconds": resume.as_ref().map(|r| r.seconds_to_first_batch),
        });
        println!("{j}");
    } else {
        println!("pipeline: {batches} batches of {batch_size} in {secs:.2} s with {workers} workers");
        println!("  images/s            {ips:>10.1}");
        println!("  images/s per core   {per_core:>10.1}");
        println!("  MB/s read           {mb_s:>10.1} (images/s x mean sample bytes)");
        println!("  per image: read {read_ms:.3} ms, decode {decode_ms:.3} ms, crop+resize+mask {augment_ms:.3} ms");
        println!("  rows decoded        {:>10.1} % (decoding stops below the crop box)", 100.0 * rows_fraction);
        println!("  peak RSS            {:>10.1} MiB", peak_rss as f64 / (1 << 20) as f64);
        println!(
            "  memory bound: {bound} decoded samples in flight (peak {peak_in_flight}), shuffle buffer {buffer} samples / {:.0} MiB",
            buffer_bytes as f64 / (1 << 20) as f64
        );
        match &resume {
            Some(r) => println!(
                "  resume at batch {} of {}: {} shard(s) read (bound {}), first batch after {:.2} s",
                r.at_batch, r.batches_per_epoch, r.shards_read, r.shards_bound, r.seconds_to_first_batch
            ),
            None if remote => println!("  resume: not measured on remote shards (it would download them again)"),
            None => println!("  resume: no sample counts (no manifest): a resume replays the epoch up to its position"),
        }
        println!(
            "decode only (1 thread, {dec_n} images of the same shards, in memory, zune-jpeg for JPEG): {dec_ips:.1} images/s"
        );
        println!("ratio pipeline per core / decode only: {ratio:.2}");
        if s1.bad > 0 {
            println!("bad samples skipped: {}", s1.bad);
        }
    }
    Ok(())
}

struct Snap {
    done: u64,
    read: u64,
    bytes: u64,
    decode_ns: u64,
    augment_ns: u64,
    read_ns: u64,
    bad: u64,
    decoded_rows: u64,
    image_rows: u64,
}

fn snapshot(l: &Loader) -> Snap {
    let s = l.stats();
    Snap {
        done: s.samples_done.load(Ordering::Relaxed),
        read: s.samples_read.load(Ordering::Relaxed),
        bytes: s.bytes_read.load(Ordering::Relaxed),
        decode_ns: s.decode_ns.load(Ordering::Relaxed),
        augment_ns: s.augment_ns.load(Ordering::Relaxed),
        read_ns: s.read_ns.load(Ordering::Relaxed),
        bad: s.bad_samples.load(Ordering::Relaxed),
        decoded_rows: s.decoded_rows.load(Ordering::Relaxed),
        image_rows: s.image_rows.load(Ordering::Relaxed),
    }
}

fn preview(args: &LoaderArgs, out: &PathBuf, n: usize) -> anyhow::Result<()> {
    let shards = source::expand(&args.shards)?;
    let cfg = args.config(n.max(1));
    let loader = Loader::new(cfg, shards, LoaderState::default())?;
    let b = loader.next_blocking().context("no batch: too few samples for one batch of --n")??;
    let (s, t, grid) = (b.view_size, b.token_size, b.grid);
    let patch = s / grid;
    let gap = 4;
    let (w, h) = (3 * s + 4 * gap, b.batch_size * (s + gap) + gap);
    let mut img = image::RgbImage::from_pixel(w as u32, h as u32, image::Rgb([255, 255, 255]));
    let mask = b.mask_bool();
    for k in 0..b.batch_size {
        let y0 = gap + k * (s + gap);
        let view = &b.views[k * 3 * s * s..(k + 1) * 3 * s * s];
        let token = &b.token_views[k * 3 * t * t..(k + 1) * 3 * t * t];
        for y in 0..s {
            for x in 0..s {
                let px = |buf: &[u8], side: usize, xx: usize, yy: usize| {
                    let p = side * side;
                    [buf[yy * side + xx], buf[p + yy * side + xx], buf[2 * p + yy * side + xx]]
                };
                let v = px(view, s, x, y);
                img.put_pixel((gap + x) as u32, (y0 + y) as u32, image::Rgb(v));
                // the 112 view, shown at the same scale (nearest neighbour)
                let tv = px(token, t, x * t / s, y * t / s);
                img.put_pixel((2 * gap + s + x) as u32, (y0 + y) as u32, image::Rgb(tv));
                let masked = mask[k * grid * grid + (y / patch) * grid + x / patch];
                let shaded = if masked { [v[0] / 3 + 120, v[1] / 3, v[2] / 3] } else { v };
                img.put_pixel((3 * gap + 2 * s + x) as u32, (y0 + y) as u32, image::Rgb(shaded));
            }
        }
    }
    img.save(out).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} ({} samples: 224 view | 112 view | masked patches shaded red)", out.display(), b.batch_size);
    for (k, key) in b.keys.iter().enumerate() {
        println!("  row {k}: {key} (class {}, {} of {} patches masked)", b.labels[k], b.num_masked, grid * grid);
    }
    Ok(())
}
