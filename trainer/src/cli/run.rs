//! `trainer run` (also the no-argument command): pre-training, fresh or resumed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;

use super::device::{OnBackend, on_device};
use super::run_plan::{OutPlan, RunPlan, ShardPlan};
use crate::builtin;
use crate::checkpoint;
use crate::config::RunConfig;
use crate::dist::{self, Dist};
use crate::run_dir;
use crate::train::{self, CONFIG_FILE, RunOptions, RunSummary, STEP_LOG};

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Run config (TOML: preset + overrides). Default: configs/cae_micro.toml (built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shards: a directory with manifest.json, a path, a brace pattern or URLs (joined by ::).
    /// Default: the built-in shapes set (generated and sharded under --data-dir if missing).
    #[arg(long)]
    pub shards: Option<String>,
    /// Run directory (default: runs/<UTC timestamp>/; with --resume: the checkpoint's run).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, cuda[:N], wgpu[:N] or wgpu:cpu.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Resume: a checkpoint file, or a run directory (its latest checkpoint); without a value,
    /// the --out directory. `--resume auto`: continue the run in --out when it has a checkpoint,
    /// else start it fresh (one command line for the first start and every requeue).
    #[arg(long, num_args = 0..=1, value_name = "CKPT|auto")]
    pub resume: Option<Option<PathBuf>>,
    /// Prometheus endpoint (`off` disables it). Only loopback unless you ask otherwise.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Optimizer steps of the whole run (sets schedule.total_steps).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Epochs of the whole run (sets schedule.epochs).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Override a config key, e.g. --set data.batch_size=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Write a checkpoint every N steps (sets checkpoint.every).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Root of the built-in data (data/shapes, data/shapes-shards).
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// No progress bar (loss lines are still printed).
    #[arg(long)]
    pub no_progress: bool,
    /// Start over in an --out directory that holds a run: its content is moved to
    /// `replaced-<time>/` inside it (nothing is deleted).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Initial weights: an mmselfsup CAE checkpoint (.pth, full or backbone only) or one of our
    /// checkpoints (weights only; optimizer, step and data start fresh).
    #[arg(long, value_name = "CKPT", conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Data parallel (launched by mpirun/srun, built with `mpi`): end the whole job when no
    /// collective has completed for this many seconds on some rank (a hung rank).
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub dist_timeout: f64,
}

/// What `--resume` asks for.
#[derive(Debug, PartialEq)]
pub(super) enum ResumeMode {
    /// A fresh run.
    No,
    /// `--resume` alone: the latest checkpoint in `--out`.
    Out,
    /// `--resume auto`: `--out`'s latest checkpoint if there is one, else a fresh run.
    Auto,
    /// `--resume PATH`.
    Path(PathBuf),
}

impl RunArgs {
    pub(super) fn resume_mode(&self) -> ResumeMode {
        match &self.resume {
            None => ResumeMode::No,
            Some(None) => ResumeMode::Out,
            Some(Some(p)) if p.as_os_str() == "auto" => ResumeMode::Auto,
            Some(Some(p)) => ResumeMode::Path(p.clone()),
        }
    }
}

/// `runs/<YYYYmmdd-HHMMSS>` in UTC.
pub(super) fn timestamp_dir() -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from("runs").join(format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60))
}

/// Dotted keys whose values differ between two configs.
pub(super) fn config_differences(a: &RunConfig, b: &RunConfig) -> anyhow::Result<Vec<String>> {
    fn walk(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(x), toml::Value::Table(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => walk(&key, u, v, out),
                        _ => out.push(key),
                    }
                }
            }
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let (x, y): (toml::Value, toml::Value) = (toml::from_str(&a.to_toml()?)?, toml::from_str(&b.to_toml()?)?);
    let mut out = Vec::new();
    walk("", &x, &y, &mut out);
    Ok(out)
}

/// SIGINT, SIGTERM and SIGHUP ([`cae_pipeline::signals`]): the first sets `stop` (the loop
/// finishes its step, writes a checkpoint and the process exits with 128 + the signal's number)
/// and records which signal it was in `signal`; a second one while `stop` is set exits at once
/// with 128 + its number. The first is acknowledged at once.
fn install_signal_handlers(stop: &Arc<AtomicBool>, signal: &Arc<AtomicUsize>) -> anyhow::Result<StopNotice> {
    cae_pipeline::signals::install(stop, signal).context("installing signal handlers")?;
    let notice = StopNotice { stop: Arc::clone(stop), signal: Arc::clone(signal), said: Arc::default() };
    notice.watch();
    Ok(notice)
}

/// Says once, as soon as it is heard, that a stop was asked for (the step in flight may take a
/// while to finish): a thread watches the flag the handlers set, and the run's end says it too
/// if the thread had not yet (a fast step can finish first).
#[derive(Clone)]
struct StopNotice {
    stop: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
    said: Arc<AtomicBool>,
}

impl StopNotice {
    fn watch(&self) {
        let notice = self.clone();
        let watch = move || {
            while !notice.stop.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            notice.say_once();
        };
        if let Err(e) = std::thread::Builder::new().name("stop-notice".into()).spawn(watch) {
            tracing::warn!("cannot start the stop-notice thread: {e}");
        }
    }

    /// The notice, if a signal asked to stop and it was not said yet.
    fn say_once(&self) {
        if !self.stop.load(Ordering::SeqCst) || self.said.swap(true, Ordering::SeqCst) {
            return;
        }
        let name = cae_pipeline::signals::name(self.signal.load(Ordering::SeqCst));
        say_err!(
            "{name} received: stopping after this step and writing a checkpoint (send it again to exit at once, \
             without one)"
        );
    }
}

pub(super) fn run_command(a: RunArgs) -> anyhow::Result<()> {
    super::init_tracing();
    if !(a.dist_timeout > 0.0 && a.dist_timeout.is_finite()) {
        super::usage!("--dist-timeout {}: expected a positive number of seconds", a.dist_timeout);
    }
    let dist = Rc::new(Dist::init(std::time::Duration::from_secs_f64(a.dist_timeout))?);
    let mut plan = RunPlan::from_args(&a, dist.world)?;
    if dist.is_parallel() {
        plan.device = plan.device.for_local_rank(&a.device, dist.local_rank);
        plan.device_name = plan.device.name();
        agree(&plan, &dist)?;
    }
    start(plan, dist)
}

/// Every rank of a group planned the same run (the same config, checkpoint and shards): a
/// rank started with another command line or working directory is refused. Also the point
/// after which rank 0 may create things: every rank has finished its checks.
fn agree(plan: &RunPlan, dist: &Dist) -> anyhow::Result<()> {
    let what = format!("{}\0{:?}\0{:?}", plan.config.to_toml()?, plan.resume, plan.shards);
    if !dist.same_everywhere(dist::digest(what.as_bytes())) {
        super::usage!(
            "rank {}: the ranks planned different runs (their config, --resume checkpoint or --shards differ): \
             start every rank with the same command line, in the same working directory",
            dist.rank
        );
    }
    Ok(())
}

/// Starts a planned run: the side effects, in order — the run dir and its lock, the built-in
/// data (rank 0 of a group, which then tells the others), the metrics endpoint, the signal
/// handlers — then the training itself.
fn start(plan: RunPlan, dist: Rc<Dist>) -> anyhow::Result<()> {
    if dist.is_root() {
        for note in &plan.notes {
            say!("{note}");
        }
    }
    let (run_dir, shards, _lock) = open_group_run(&plan, &dist)?;
    dist.heartbeat_in(run_dir.join("ranks"));
    let metrics_url = plan.metrics_addr.and_then(|a| start_metrics(a, &dist));
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicUsize::new(0));
    let notice = install_signal_handlers(&stop, &signal)?;
    print_header(&plan, &dist, &run_dir, metrics_url.as_deref());
    let opts = RunOptions {
        run_dir,
        shards,
        resume: plan.resume.clone(),
        stop,
        signal: Arc::clone(&signal),
        dist: Rc::clone(&dist),
        progress: plan.progress && dist.is_root(),
        quiet: false,
        init_from: plan.init_from.clone(),
    };
    let summary = on_device(plan.device, Train(&plan.config, &opts));
    notice.say_once();
    let summary = summary?;
    print_summary(&summary, &dist, metrics_url.as_deref());
    if summary.interrupted {
        // Stopped by a signal before the schedule's end, its checkpoint written: a scheduler
        // (Kubernetes Job, Slurm requeue) must not take this for a finished run. In a group,
        // every rank exits with the signal that stopped it, whichever rank received it.
        let own = signal.load(Ordering::SeqCst) as i32;
        return Err(super::Stopped { signal: summary.stop_signal.unwrap_or(own) }.into());
    }
    Ok(())
}

/// The run dir (created and locked) and the shard source (the built-in data made if needed):
/// rank 0's work, its outcome broadcast to the other ranks of a group (a failure there ends
/// every rank with the same exit status).
fn open_group_run(plan: &RunPlan, dist: &Dist) -> anyhow::Result<(PathBuf, String, Option<run_dir::RunLock>)> {
    if !dist.is_root() {
        let told = dist.broadcast_string("");
        return match told.splitn(3, '\0').collect::<Vec<_>>()[..] {
            ["ok", dir, shards] => Ok((PathBuf::from(dir), shards.to_string(), None)),
            ["error", "2", why] => Err(crate::CaeError::Usage(format!("rank 0 could not start the run: {why}")).into()),
            [_, _, why] => anyhow::bail!("rank 0 could not start the run: {why}"),
            _ => anyhow::bail!("rank 0 sent no run directory"),
        };
    }
    let outcome = make_run(plan);
    if dist.is_parallel() {
        let message = match &outcome {
            Ok((run_dir, shards, _)) => format!("ok\0{}\0{shards}", run_dir.to_string_lossy()),
            Err(e) => format!("error\0{}\0{e:#}", super::exit_code(e)),
        };
        dist.broadcast_string(&message);
    }
    outcome
}

/// Rank 0's part of the start: the run dir, created and locked, and the shard source.
fn make_run(plan: &RunPlan) -> anyhow::Result<(PathBuf, String, Option<run_dir::RunLock>)> {
    let (run_dir, lock) = open_run_dir(plan)?;
    let shards = match &plan.shards {
        ShardPlan::Given(s) => s.clone(),
        ShardPlan::Builtin(data) => builtin::ensure(data, &mut |l| say!("{l}"))?.to_string_lossy().into_owned(),
    };
    Ok((run_dir, shards, Some(lock)))
}

/// The run directory, created and locked for this process; a fresh run never writes into another
/// run (checked again under the lock: the plan's check ran before it was taken).
fn open_run_dir(plan: &RunPlan) -> anyhow::Result<(PathBuf, run_dir::RunLock)> {
    let run_dir = match &plan.out {
        OutPlan::Dir(d) => d.clone(),
        OutPlan::Fresh(base) => run_dir::create_unique(base)?,
    };
    let lock = run_dir::lock(&run_dir)?;
    let stamp = timestamp_dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let taken = run_dir::holds_run(&run_dir);
    if plan.resume.is_none() && taken && !plan.force {
        super::usage!(
            "{} holds a run: --resume continues it, --force starts over (the old run is moved to {}/replaced-<time>/, \
             nothing is deleted)",
            run_dir.display(),
            run_dir.display()
        );
    }
    if plan.resume.is_none() && (taken || run_dir::has_leftovers(&run_dir)) {
        let aside = run_dir::move_aside(&run_dir, &stamp)?;
        match taken {
            true => say!("--force: the run that was in {} is now in {}", run_dir.display(), aside.display()),
            false => say!(
                "the step log of a run without a checkpoint in {} is now in {}",
                run_dir.display(),
                aside.display()
            ),
        }
    }
    Ok((run_dir, lock))
}

/// Binds the Prometheus endpoint (a data-parallel rank: the port plus its local rank, series
/// labelled `rank`); a failure is a warning (the run goes on without it).
fn start_metrics(addr: SocketAddr, dist: &Dist) -> Option<String> {
    let addr = SocketAddr::new(addr.ip(), addr.port().saturating_add(dist.local_rank as u16));
    if !addr.ip().is_loopback() {
        say_err!(
            "warning: --metrics-addr {addr} is not a loopback address: the metrics endpoint has no \
             authentication, anyone who can reach this port can read it"
        );
    }
    match crate::metrics::install(addr, dist.is_parallel().then_some(dist.rank)) {
        Ok(()) => Some(format!("http://{addr}/metrics")),
        Err(e) => {
            say_err!("warning: {e}; continuing without the Prometheus endpoint");
            None
        }
    }
}

fn print_header(plan: &RunPlan, dist: &Dist, run_dir: &Path, metrics_url: Option<&str>) {
    let config = &plan.config;
    if !dist.is_root() {
        say!(
            "rank {} of {} (local {} of {}): device {}, metrics {}",
            dist.rank,
            dist.world,
            dist.local_rank,
            dist.local_world,
            plan.device_name,
            metrics_url.unwrap_or("off")
        );
        return;
    }
    say!(
        "run {}: preset {:?}, target {:?}, batch {} x {} accumulation, peak lr {:.3e}, device {}, {}{}",
        run_dir.display(),
        config.preset,
        config.model.target,
        config.data.batch_size,
        config.optimizer.accumulation_steps,
        config.peak_lr(),
        plan.device_name,
        format!("{:?}", config.precision.dtype).to_lowercase(),
        if config.precision.scaling() { " with dynamic loss scaling" } else { "" }
    );
    if dist.is_parallel() {
        say!(
            "  group       {} processes x {} images x {} micro-batch(es) = {} images per step (rank 0 on {})",
            dist.world,
            config.data.batch_size,
            plan.accumulation,
            config.total_batch(),
            plan.device_name
        );
    }
    if plan.device.is_cpu() {
        say!(
            "  threads     {} for the step (burn-flex on rayon; RAYON_NUM_THREADS), {} decode workers (data.workers)",
            rayon::current_num_threads(),
            config.data.worker_count()
        );
    }
    say!("  config      {}", run_dir.join(CONFIG_FILE).display());
    say!("  step log    {}", run_dir.join(STEP_LOG).display());
    say!("  checkpoints {}", run_dir.join(checkpoint::CHECKPOINT_DIR).display());
    say!("  metrics     {}", metrics_url.unwrap_or("off"));
}

/// `train::run` on a backend (with autodiff).
struct Train<'a>(&'a RunConfig, &'a RunOptions);

impl OnBackend for Train<'_> {
    type Output = RunSummary;
    fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<RunSummary> {
        Ok(train::run::<Autodiff<B>>(self.0, self.1, device)?)
    }
}

fn print_summary(s: &RunSummary, dist: &Dist, metrics_url: Option<&str>) {
    let steps = s.end_step - s.start_step;
    if !dist.is_root() {
        say!("rank {}: done, steps {} -> {}{}", dist.rank, s.start_step, s.end_step, stopped_note(s));
        return;
    }
    say!(
        "done: steps {} -> {} of {} in {:.1} s ({:.2} steps/s), data wait {:.1}% of step time (tokenizer {:.1}%){}",
        s.start_step,
        s.end_step,
        s.total_steps,
        s.seconds,
        steps as f64 / s.seconds.max(1e-9),
        100.0 * s.data_wait_fraction,
        100.0 * s.tokenizer_wait_fraction,
        stopped_note(s)
    );
    if let (Some(a), Some(b), Some(ea), Some(lb)) = (s.first_loss, s.last_loss, s.early_mean_loss, s.late_mean_loss) {
        say!("loss {a:.4} -> {b:.4} (mean of the first 10% of steps {ea:.4}, of the last 10% {lb:.4})");
    }
    if let Some(c) = &s.last_checkpoint {
        say!("checkpoint {}", c.display());
    }
    say!("step log {}", s.run_dir.join(STEP_LOG).display());
    if let Some(u) = metrics_url {
        say!("metrics were served at {u} (the endpoint closes with the process)");
    }
}

fn stopped_note(s: &RunSummary) -> &'static str {
    if s.interrupted { " (interrupted)" } else { "" }
}
