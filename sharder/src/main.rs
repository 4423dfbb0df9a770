//! `sharder`: build and verify WebDataset shards (see the crate docs of `cae_sharder`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use cae_sharder::{BuildOptions, BuildReport, ShardError, Validate, build, verify};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "sharder", version, about = "ImageNet-style folder -> WebDataset tar shards")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Shard a folder `DIR/<class>/*` (or a `--list`) into `<prefix>-NNNNNN.tar` files.
    Build(BuildArgs),
    /// Check shards against their manifest (sha256, tar structure, keys, members, decoding).
    Verify {
        /// Shard directory holding manifest.json.
        dir: PathBuf,
        /// Also decode every image.
        #[arg(long)]
        decode: bool,
    },
    /// Measure sharding speed against plain file reading on the same input, in one run.
    Bench {
        /// Input folder of class folders.
        #[arg(long)]
        input: PathBuf,
        /// Scratch folder for the shards (default: a temporary folder).
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// Drop the page cache before each measurement (needs root): compares against reading
        /// from the storage itself, where sharding should be I/O-bound.
        #[arg(long)]
        cold: bool,
    },
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// Input folder: class folders `<class>/<file>`, or the root the --list paths are relative to.
    #[arg(long)]
    input: PathBuf,
    /// Output folder for shards, manifest.json, classes.txt, rejected.tsv.
    #[arg(long)]
    output: PathBuf,
    /// Tab-separated `relative/path<TAB>class` list instead of walking class folders. Without
    /// --classes the class indices are the list's own (a warning says so).
    #[arg(long)]
    list: Option<PathBuf>,
    /// Class order to use (one name per line, e.g. the train shards' classes.txt).
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Most samples per shard.
    #[arg(long, default_value_t = 10_000)]
    shard_max_samples: u64,
    /// Most bytes per shard.
    #[arg(long, default_value_t = 1 << 30)]
    shard_max_bytes: u64,
    /// Shard file name prefix.
    #[arg(long, default_value = "train")]
    prefix: String,
    /// Seed of the global sample shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Reader/validator threads (default: all cores).
    #[arg(long)]
    workers: Option<usize>,
    /// How each image is checked.
    #[arg(long, value_enum, default_value_t = Validate::Decode)]
    validate: Validate,
    /// Re-encode images whose longer side exceeds N pixels (cuts decode cost later).
    #[arg(long, value_name = "N")]
    max_side: Option<u32>,
    /// Reject input files larger than this many bytes, from their size, without reading them.
    #[arg(long, default_value_t = cae_sharder::process::DEFAULT_MAX_FILE_BYTES)]
    max_file_bytes: u64,
    /// Keep complete shards of an interrupted run and finish the rest (with the options it was
    /// started with: a changed one is refused by name).
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Overwrite an existing output.
    #[arg(long)]
    force: bool,
    /// Exit non-zero if any input file is rejected; then no manifest.json is written (the shards
    /// are not a finished set), also on --resume.
    #[arg(long)]
    strict: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Build(a) => build_command(a),
        Command::Verify { dir, decode } => {
            let r = verify(&dir, decode, std::io::stderr().is_terminal())
                .with_context(|| format!("verifying {}", dir.display()))?;
            println!(
                "{} shards, {} samples, {:.1} MB{}",
                r.shards,
                r.samples,
                r.bytes as f64 / 1e6,
                if decode { format!(", {} images decoded", r.decoded) } else { String::new() }
            );
            if let Some(first) = r.problems.first() {
                eprintln!("FIRST PROBLEM: {first}");
                for p in r.problems.iter().skip(1).take(20) {
                    eprintln!("  {p}");
                }
                eprintln!("{} problem(s) found", r.problems.len());
                return Ok(ExitCode::FAILURE);
            }
            println!("OK");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { input, scratch, cold } => bench(input, scratch, cold),
    }
}

/// `sharder build`. SIGINT, SIGTERM or SIGHUP stops it (`cae_pipeline::signals`): the complete
/// shards stay journaled, the one in progress is dropped, and the exit status is 128 + N; a
/// second signal exits at once.
fn build_command(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicUsize::new(0));
    cae_pipeline::signals::install(&stop, &signal).context("installing signal handlers")?;
    let opts = BuildOptions {
        input: a.input,
        output: a.output,
        list: a.list,
        classes: a.classes,
        shard_max_samples: a.shard_max_samples.max(1),
        shard_max_bytes: a.shard_max_bytes,
        prefix: a.prefix,
        seed: a.seed,
        workers: a.workers.unwrap_or_else(cae_sharder::build::default_workers),
        validate: a.validate,
        max_side: a.max_side,
        max_file_bytes: a.max_file_bytes,
        resume: a.resume,
        force: a.force,
        strict: a.strict,
        progress: std::io::stderr().is_terminal(),
        stop: Some(stop),
    };
    let r = match build(&opts) {
        Ok(r) => r,
        Err(e @ ShardError::Stopped { .. }) => {
            let n = signal.load(Ordering::SeqCst);
            eprintln!("sharder: {} received: {e}", cae_pipeline::signals::name(n));
            return Ok(ExitCode::from(u8::try_from(128 + n).unwrap_or(1)));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("sharding {}", opts.input.display()))),
    };
    print_summary(&opts, &r);
    Ok(ExitCode::SUCCESS)
}

/// The build's summary on stdout. A resumed build counts this run's work, then what was kept.
fn print_summary(opts: &BuildOptions, r: &BuildReport) {
    let see = if r.rejected > 0 { format!(" (see {}/rejected.tsv)", opts.output.display()) } else { String::new() };
    if r.already_complete {
        println!(
            "already complete, nothing to do: {} input files: {} sharded into {} shards ({} converted), {} rejected{see}",
            r.input_files, r.samples, r.shards, r.converted, r.rejected
        );
        return;
    }
    let t = r.this_run();
    let this = format!(
        "{} input files: {} sharded into {} shards ({} converted), {} rejected",
        t.input_files, t.samples, t.shards, t.converted, t.rejected
    );
    if opts.resume {
        let k = r.kept;
        println!(
            "resumed: kept {} complete shards already there ({} samples from {} input files, {} converted, {} rejected)",
            k.shards, k.samples, k.input_files, k.converted, k.rejected
        );
        println!("this run: {this}");
        println!(
            "whole set: {} input files: {} sharded into {} shards, {} rejected{see}",
            r.input_files, r.samples, r.shards, r.rejected
        );
    } else {
        println!("{this}{see}");
    }
    println!(
        "processed {} files in {:.2} s: {:.0} images/s, {:.1} MB/s read, {:.1} MB written",
        r.files_processed,
        r.seconds,
        r.images_per_second(),
        r.mb_per_second(),
        r.bytes_written as f64 / 1e6
    );
}

/// Plain reading of every input file vs `build --validate header` (all workers) vs
/// `build --validate decode` with 1 and 2 workers, on the same files, in one run.
/// Flushes dirty pages and empties the page cache (Linux, root).
fn drop_caches() -> anyhow::Result<()> {
    let ok = std::process::Command::new("sync").status().map(|s| s.success()).unwrap_or(false);
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("--cold needs root (writing /proc/sys/vm/drop_caches)")?;
    if !ok {
        anyhow::bail!("sync failed");
    }
    Ok(())
}

fn bench(input: PathBuf, scratch: Option<PathBuf>, cold: bool) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::tempdir()?;
    let scratch = scratch.unwrap_or_else(|| tmp.path().to_path_buf());
    let listing = cae_sharder::input::walk_class_folders(&input)?;
    let read_all = || -> anyhow::Result<(f64, u64)> {
        let t = Instant::now();
        let mut bytes = 0u64;
        for f in &listing.files {
            bytes += std::fs::read(&f.path).map(|b| b.len() as u64).unwrap_or(0);
        }
        Ok((t.elapsed().as_secs_f64(), bytes))
    };
    // Every measurement starts from the same storage state: warm (page cache filled) or cold.
    let prepare = || -> anyhow::Result<()> { if cold { drop_caches() } else { read_all().map(|_| ()) } };
    prepare()?;
    let (read_s, bytes) = read_all()?;
    let run = |validate: Validate, workers: usize, name: &str| -> anyhow::Result<f64> {
        prepare()?;
        let mut o = BuildOptions::new(&input, scratch.join(name));
        o.validate = validate;
        o.workers = workers;
        o.force = true;
        o.shard_max_samples = 1000;
        let r = build(&o)?;
        Ok(r.seconds)
    };
    let header_s = run(Validate::Header, cae_sharder::build::default_workers(), "header")?;
    let dec1 = run(Validate::Decode, 1, "decode1")?;
    let dec2 = run(Validate::Decode, 2, "decode2")?;
    let n = listing.files.len() as f64;
    println!(
        "files: {}  bytes: {:.1} MB  page cache: {}",
        listing.files.len(),
        bytes as f64 / 1e6,
        if cold { "dropped before each run (cold)" } else { "warm" }
    );
    println!("read only        : {:>8.0} images/s {:>8.1} MB/s", n / read_s, bytes as f64 / 1e6 / read_s);
    println!("build header     : {:>8.0} images/s  ratio to read-only {:.2}", n / header_s, read_s / header_s);
    println!("build decode w=1 : {:>8.0} images/s", n / dec1);
    println!("build decode w=2 : {:>8.0} images/s  speed-up over w=1 {:.2}", n / dec2, dec1 / dec2);
    Ok(ExitCode::SUCCESS)
}
