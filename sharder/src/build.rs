//! `sharder build`: input listing -> seeded global shuffle -> parallel read/validate -> ordered,
//! atomic, resumable shard writing.
//!
//! Output directory:
//!
//! ```text
//! <prefix>-000000.tar ...   complete shards (written as .<name>.tmp, fsynced, then renamed)
//! manifest.json             every shard with samples, bytes, sha256; totals (written last)
//! classes.txt               class names, line i = class index i
//! rejected.tsv              path<TAB>reason for every rejected input file
//! .sharder-journal.jsonl    only while a run is unfinished: the plan, one line per completed shard
//! .sharder-plan             the finished build's plan (the journal's first line)
//! ```
//!
//! Determinism: the sample order is a Fisher-Yates shuffle of the sorted input listing seeded
//! with `--seed`; workers only read and validate, the writer consumes their results in that
//! order, so shards are byte-identical whatever the worker count. `--resume` re-reads the
//! journal, checks every journaled shard (size and sha256) and continues at the first input file
//! after the last complete shard: the result equals an uninterrupted run. A changed option or
//! input is refused by name (the plan records each option and a digest of the input).
//!
//! Stopping: when [`BuildOptions::stop`] is set (the binary's SIGINT/SIGTERM/SIGHUP handler),
//! the build stops after the file in hand, drops the shard in progress, lets the complete ones
//! land in the journal and returns [`ShardError::Stopped`]; `--resume` finishes it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cae_pipeline::manifest::{MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ShardEntry};
use cae_pipeline::ordered_map::{self, MapConfig};
use cae_pipeline::wds::{CLASS_EXT, IMAGE_EXT, META_EXT, ShardWriter, sha256_file};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ShardError;
use crate::input::{self, InputListing};
use crate::process::{Outcome, Prepared, ProcessOptions, Validate, process};

mod journal;
mod plan;
mod writer;
pub(crate) use journal::journaled_shards;
use journal::{Done, JournalLine, kept_counts, read_journal, rewrite_journal};
use plan::{Plan, PlanParts};
use writer::{Finisher, OrderedWriter};

/// Name of the resume journal.
pub const JOURNAL_FILE: &str = ".sharder-journal.jsonl";
/// Name of the rejection list.
pub const REJECTED_FILE: &str = "rejected.tsv";
/// Name of the class list.
pub const CLASSES_FILE: &str = "classes.txt";
/// Digest of the input and options of the finished build (lets `--resume` recognise it).
pub const PLAN_FILE: &str = ".sharder-plan";
/// Environment variable for crash tests: abort (like `kill -9`) in the middle of the shard after
/// this many shards were completed by this process.
pub const CRASH_ENV: &str = "CAE_SHARDER_CRASH_AFTER_SHARDS";
/// Environment variable for kill tests: like [`CRASH_ENV`] but the process stops (sleeps) in the
/// middle of the shard, printing `sharder: paused` to stderr, so a test can `kill -9` it there.
pub const HANG_ENV: &str = "CAE_SHARDER_HANG_AFTER_SHARDS";
/// Environment variable for signal tests: after this many input files were taken by this process
/// (the completed shards landed first), print `sharder: paused` to stderr and wait until
/// [`BuildOptions::stop`] is set, so a signal lands at a known point in the middle of a shard.
pub const PAUSE_ENV: &str = "CAE_SHARDER_PAUSE_AFTER_FILES";

/// The value of a test hook's variable; always `None` unless built with feature `test-hooks`.
fn test_hook(var: &str) -> Option<u64> {
    if !cfg!(feature = "test-hooks") {
        return None;
    }
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

/// Rejections warned about one line each before they are summarised per shard.
const WARN_EACH: u64 = 10;

/// Everything `sharder build` needs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// `path<TAB>class` list instead of walking class folders.
    pub list: Option<PathBuf>,
    /// Fixed class order (one name per line), e.g. the train set's classes.txt.
    pub classes: Option<PathBuf>,
    pub shard_max_samples: u64,
    pub shard_max_bytes: u64,
    pub prefix: String,
    pub seed: u64,
    pub workers: usize,
    pub validate: Validate,
    pub max_side: Option<u32>,
    /// Input files larger than this are rejected before they are read.
    pub max_file_bytes: u64,
    pub resume: bool,
    pub force: bool,
    pub strict: bool,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
    /// Set (by a signal handler) to stop early: the shards completed so far are kept and
    /// journaled, the shard in progress is dropped, and the build returns
    /// [`ShardError::Stopped`]; `--resume` then finishes it.
    pub stop: Option<Arc<AtomicBool>>,
}

impl BuildOptions {
    /// Defaults of the command line for the given folders.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            output: output.into(),
            list: None,
            classes: None,
            shard_max_samples: 10_000,
            shard_max_bytes: 1 << 30,
            prefix: "train".into(),
            seed: 0,
            workers: default_workers(),
            validate: Validate::Decode,
            max_side: None,
            max_file_bytes: crate::process::DEFAULT_MAX_FILE_BYTES,
            resume: false,
            force: false,
            strict: false,
            progress: false,
            stop: None,
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// The error of a build stopped by [`Self::stop`], counting the shards journaled so far.
    fn stopped(&self) -> ShardError {
        ShardError::Stopped { path: self.output.clone(), shards: journaled_shards(&self.output) }
    }
}

/// All cores.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Counts of a shard set, or of a part of one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Input files accounted for (sharded or rejected).
    pub input_files: u64,
    pub samples: u64,
    pub shards: u64,
    pub converted: u64,
    pub rejected: u64,
}

/// What a build did. The counts without a prefix are the whole set's (the manifest's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildReport {
    pub input_files: u64,
    pub samples: u64,
    pub rejected: u64,
    pub converted: u64,
    pub shards: u64,
    /// Input bytes read by this process (resumed parts are not re-read).
    pub bytes_read: u64,
    /// Shard bytes in the output.
    pub bytes_written: u64,
    /// Input files processed by this process.
    pub files_processed: u64,
    pub seconds: f64,
    /// What `--resume` found complete and kept (all zero without `--resume`).
    pub kept: Counts,
    /// `--resume` found the build finished already: nothing was done.
    pub already_complete: bool,
}

impl BuildReport {
    /// What this process added to the set: the whole set less what was kept.
    pub fn this_run(&self) -> Counts {
        Counts {
            input_files: self.input_files - self.kept.input_files,
            samples: self.samples - self.kept.samples,
            shards: self.shards - self.kept.shards,
            converted: self.converted - self.kept.converted,
            rejected: self.rejected - self.kept.rejected,
        }
    }
    pub fn images_per_second(&self) -> f64 {
        self.files_processed as f64 / self.seconds.max(1e-9)
    }
    pub fn mb_per_second(&self) -> f64 {
        self.bytes_read as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// Runs a build.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, ShardError> {
    let start = Instant::now();
    let listing = list_input(opts)?;
    let n = listing.files.len() as u64;
    let plan = plan::plan(opts, &listing);
    if opts.stop_requested() {
        return Err(opts.stopped());
    }
    prepare_output(opts)?;

    // Journal: what an earlier, interrupted run already completed.
    let journal_path = opts.output.join(JOURNAL_FILE);
    let mut done: Vec<Done> = Vec::new();
    if opts.resume {
        if let Some(m) = finished_manifest(opts, &plan)? {
            tracing::info!("{} is already complete ({} shards)", opts.output.display(), m.shards.len());
            if opts.strict && m.rejected > 0 {
                return Err(ShardError::Strict(m.rejected));
            }
            return Ok(report_from_manifest(&m, start));
        }
        done = read_journal(&journal_path, &plan, opts)?;
    }
    let kept = kept_counts(&done);
    rewrite_journal(&journal_path, &plan, &done)?;

    let mut order: Vec<usize> = (0..listing.files.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed));
    let next_input = kept.input_files;
    let mut writer = OrderedWriter {
        opts,
        journal_path: journal_path.clone(),
        shard_index: done.len() as u64,
        current: None,
        done,
        pending_rejected: Vec::new(),
        pending_converted: 0,
        warned: 0,
        // Test hooks exist only in test builds (feature `test-hooks`, which the tests enable).
        crash_after: test_hook(CRASH_ENV),
        hang_after: test_hook(HANG_ENV),
        completed_here: 0,
        finisher: Finisher::start(journal_path.clone())?,
    };
    let pb = progress_bar(opts.progress, n - next_input);
    let todo = &order[next_input as usize..];
    let written = write_inputs(opts, &listing.files, todo, &mut writer, &pb, start);
    pb.finish_and_clear();
    let (bytes_read, stopped) = written?;
    if stopped {
        writer.abandon()?;
        return Err(opts.stopped());
    }
    writer.close_shard(n)?;

    // With --strict and a rejection, finish() writes rejected.tsv but no manifest.
    let manifest = writer.finish(&listing, n)?;
    Ok(BuildReport {
        input_files: n,
        samples: manifest.total_samples,
        rejected: manifest.rejected,
        converted: manifest.converted,
        shards: manifest.shards.len() as u64,
        bytes_read,
        bytes_written: manifest.total_bytes,
        files_processed: n - next_input,
        seconds: start.elapsed().as_secs_f64(),
        kept,
        already_complete: false,
    })
}

/// Reads and validates the inputs `todo` (indices into `files`, in shuffled order) on the
/// workers and hands the results to the writer in that order. Returns the bytes read and
/// whether [`BuildOptions::stop`] ended it early (the writer's open shard is then incomplete).
fn write_inputs(
    opts: &BuildOptions,
    files: &[input::InputFile],
    todo: &[usize],
    writer: &mut OrderedWriter<'_>,
    pb: &ProgressBar,
    start: Instant,
) -> Result<(u64, bool), ShardError> {
    let popts =
        ProcessOptions { validate: opts.validate, max_side: opts.max_side, max_file_bytes: opts.max_file_bytes };
    let workers = opts.workers.max(1);
    let next_input = (files.len() - todo.len()) as u64;
    let pause_after = test_hook(PAUSE_ENV);
    let mut bytes_read = 0u64;
    std::thread::scope(|s| -> Result<(u64, bool), ShardError> {
        // One bounded ordered map (the pipeline's): at most K = 2 x workers files read and not
        // yet written, whatever is slow; results come back in shuffled input order. (Files can
        // be up to --max-file-bytes each, so K is smaller than the loader's 8 x workers.)
        let map = MapConfig { workers, bound: 2 * workers, name: "sharder-worker".into() };
        let (mut submit, mut results) = ordered_map::start(
            &map,
            || (),
            |_, &idx: &usize| {
                let mut read = 0;
                let out = process(&files[idx], &popts, &mut read);
                (out, read)
            },
            |&idx, what| {
                let reason = format!("processing panicked (a bug, please report it with this file): {what}");
                (Outcome::Rejected { rel_path: files[idx].rel_path.clone(), reason }, 0)
            },
            |name, body| std::thread::Builder::new().name(name).spawn_scoped(s, body).map(drop),
        )
        .map_err(|e| ShardError::Internal(format!("starting workers: {e}")))?;
        s.spawn(move || {
            for &idx in todo {
                if submit.submit(idx).is_err() {
                    break; // the writer stopped (error or signal): stop feeding
                }
            }
        });
        let mut next_seq = 0u64;
        while let Some((out, read)) = results.recv() {
            bytes_read += read;
            let input_pos = next_input + next_seq + 1;
            writer.accept(out, input_pos)?;
            next_seq += 1;
            pb.inc(1);
            if pause_after == Some(next_seq) {
                writer.pause_until_stopped()?;
            }
            if opts.stop_requested() {
                return Ok((bytes_read, true)); // dropping `results` stops the workers
            }
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            if next_seq.is_multiple_of(64) {
                pb.set_message(format!("{:.1} MB/s", bytes_read as f64 / 1e6 / secs));
            }
        }
        if results.stranded() > 0 {
            return Err(ShardError::Internal(format!("{} results stranded: a worker died", results.stranded())));
        }
        Ok((bytes_read, false))
    })
}

fn list_input(opts: &BuildOptions) -> Result<InputListing, ShardError> {
    let fixed_classes = match &opts.classes {
        Some(p) => Some(
            fs::read_to_string(p)
                .map_err(|e| ShardError::input(p, e))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    match &opts.list {
        Some(list) => {
            let l = input::read_list(&opts.input, list, fixed_classes)?;
            if opts.classes.is_none() {
                tracing::warn!(
                    "--list without --classes: class indices follow this list's own {} classes (sorted by \
                     name), so they match a train set's only if the list has every one of its classes; \
                     for a val set pass --classes <train shards>/{CLASSES_FILE}",
                    l.classes.len()
                );
            }
            Ok(l)
        }
        None => {
            let mut l = input::walk_class_folders(&opts.input)?;
            if let Some(c) = fixed_classes {
                let relisted = InputListing { files: Vec::new(), classes: c };
                let index: std::collections::HashMap<&str, usize> =
                    relisted.classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
                for f in &mut l.files {
                    f.class_index = f.class.as_deref().and_then(|c| index.get(c).copied());
                    if f.class.is_some() && f.class_index.is_none() {
                        return Err(ShardError::Input {
                            path: f.path.clone(),
                            message: format!("class {:?} is not in the given classes file", f.class),
                        });
                    }
                }
                l.classes = relisted.classes;
            }
            Ok(l)
        }
    }
}

fn is_ours(name: &str, prefix: &str) -> bool {
    name == MANIFEST_FILE
        || name == JOURNAL_FILE
        || name == REJECTED_FILE
        || name == CLASSES_FILE
        || name == PLAN_FILE
        || (name.starts_with(&format!("{prefix}-")) && name.ends_with(".tar"))
        || (name.starts_with('.') && name.ends_with(".tmp"))
}

fn prepare_output(opts: &BuildOptions) -> Result<(), ShardError> {
    let out = &opts.output;
    fs::create_dir_all(out).map_err(|e| ShardError::write(out, e))?;
    let entries: Vec<PathBuf> =
        fs::read_dir(out).map_err(|e| ShardError::write(out, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    if entries.is_empty() {
        return Ok(());
    }
    if opts.force {
        for p in entries {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if is_ours(&name, &opts.prefix) {
                fs::remove_file(&p).map_err(|e| ShardError::write(&p, e))?;
            }
        }
        return Ok(());
    }
    if opts.resume {
        // Torn temporary files of the interrupted run are never complete: drop them.
        for p in entries {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(&p).map_err(|e| ShardError::write(&p, e))?;
            }
        }
        return Ok(());
    }
    Err(ShardError::OutputNotEmpty(out.clone()))
}

fn finished_manifest(opts: &BuildOptions, plan: &Plan) -> Result<Option<Manifest>, ShardError> {
    let path = opts.output.join(MANIFEST_FILE);
    if !path.exists() || opts.output.join(JOURNAL_FILE).exists() {
        return Ok(None);
    }
    let m = Manifest::load(&path).map_err(|e| ShardError::Resume { path: path.clone(), message: e.to_string() })?;
    // The plan file holds the journal's header line (earlier versions: the bare digest).
    let recorded = fs::read_to_string(opts.output.join(PLAN_FILE)).ok().map(|text| {
        match serde_json::from_str::<JournalLine>(text.trim()) {
            Ok(JournalLine::Header { plan, parts }) => (plan, parts),
            _ => (text.trim().to_string(), None),
        }
    });
    match recorded {
        Some((digest, _)) if digest == plan.digest => Ok(Some(m)),
        other => Err(ShardError::Resume {
            path: opts.output.clone(),
            message: plan::changed_message(
                "a finished build is there, made",
                other.as_ref().and_then(|(_, parts)| parts.as_ref()),
                &plan.parts,
                "use --force to rebuild",
            ),
        }),
    }
}

fn report_from_manifest(m: &Manifest, start: Instant) -> BuildReport {
    let kept = Counts {
        input_files: m.input_files,
        samples: m.total_samples,
        shards: m.shards.len() as u64,
        converted: m.converted,
        rejected: m.rejected,
    };
    BuildReport {
        input_files: m.input_files,
        samples: m.total_samples,
        rejected: m.rejected,
        converted: m.converted,
        shards: m.shards.len() as u64,
        bytes_written: m.total_bytes,
        seconds: start.elapsed().as_secs_f64(),
        kept,
        already_complete: true,
        ..Default::default()
    }
}

/// Writes `path` via a temporary file, fsync and rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ShardError> {
    let tmp = tmp_path(path);
    let mut f = fs::File::create(&tmp).map_err(|e| ShardError::write(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| ShardError::write(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| ShardError::write(path, e))?;
    sync_dir(path);
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = name.trim_start_matches('.');
    path.with_file_name(format!(".{name}.tmp"))
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

fn progress_bar(show: bool, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}
