//! The `trainer` command line (the binary is a thin wrapper around [`main_from`], which lives
//! here so the end-to-end tests can run it in a child process). One file per subcommand;
//! [`device`] is the only place that picks a backend (burn-flex on the CPU, burn-cuda and
//! burn-wgpu with their cargo features).

mod bench;
pub mod device;
mod eval;
mod export;
mod gpu_check;
mod run;
mod run_plan;
mod tokens;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

pub use bench::BenchArgs;
pub use device::{DeviceKind, OnBackend, on_device};
pub use eval::{EncoderArgs, EvalSets, FeaturesArgs, KnnArgs, LinearArgs};
pub use export::ExportArgs;
pub use gpu_check::GpuCheckArgs;
pub use run::RunArgs;
pub use tokens::TokensArgs;

/// The shipped micro config: the no-argument run.
pub const MICRO_CONFIG: &str = include_str!("../../../configs/cae_micro.toml");
/// Where the no-argument run looks for the DALL-E tokenizer (spec §3).
pub const DALLE_CHECKPOINT: &str = "cae_ckpt/dalle_encoder.pth";

#[derive(Parser, Debug)]
#[command(name = "trainer", about = "CAE pre-training (burn), fed by the cae pipeline", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pre-train (the default command). With no arguments: the micro preset on the built-in
    /// shapes set, on the CPU, for about six minutes.
    Run(RunArgs),
    /// Export the pre-trained encoder of a checkpoint as safetensors (timm or mmselfsup names).
    Export(ExportArgs),
    /// Steps/s and images/s of a preset: synthetic batches (compute only), then the real
    /// pipeline, with the data-wait fraction.
    Bench(BenchArgs),
    /// Print, as JSON, each image's DALL-E token ids from its centre view (spec §3).
    Tokens(TokensArgs),
    /// Same weights and batch on the CPU and on a device: the losses must agree; then time
    /// forward + backward on the device (see tools/gpu-check.sh).
    GpuCheck(GpuCheckArgs),
    /// Encoder features (cls and mean-pooled patch tokens) of every sample of a shard set, as
    /// safetensors (`cls`, `mean`, `labels`, `keys`).
    Features(FeaturesArgs),
    /// Evaluate a checkpoint's representations.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Weighted k-NN (cosine, k = 20, T = 0.07) top-1/top-5 on frozen encoder features.
    Knn(KnnArgs),
    /// Linear probe: a linear classifier on frozen, per-dimension-normalised features (lr chosen
    /// on a held-out part of the training split), top-1/top-5.
    Linear(LinearArgs),
}

/// A run stopped by signal `signal` after writing its checkpoint: the process exits with
/// `128 + signal` (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as a shell reports a signal's death.
#[derive(Debug, thiserror::Error)]
#[error("stopped by signal {signal} after writing the checkpoint; resume with --resume")]
pub struct Stopped {
    pub signal: i32,
}

/// The process exit status for a command's error (the README's table): `128 + N` after a stop by
/// signal N ([`Stopped`]), 2 for a usage or config error, 1 for every other error.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(s) = e.downcast_ref::<Stopped>() {
        return u8::try_from(128 + s.signal).unwrap_or(1);
    }
    match e.downcast_ref::<crate::CaeError>() {
        Some(crate::CaeError::Config(_) | crate::CaeError::Usage(_)) => 2,
        _ => 1,
    }
}

/// Returns a [`crate::CaeError::Usage`] error (exit status 2) from the enclosing function.
macro_rules! usage {
    ($($t:tt)*) => {
        return Err(crate::CaeError::Usage(format!($($t)*)).into())
    };
}
pub(crate) use usage;

/// Parses `args` (argv, program name first) and runs the command.
pub fn main_from<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I) -> anyhow::Result<()> {
    let cli = Cli::parse_from(args);
    // The command runs on a worker of rayon's global pool, the pool burn-flex's CPU kernels
    // (GEMM, softmax, LayerNorm, ...) fork into. Called from a thread outside the pool, every
    // parallel kernel would be injected into the pool while this thread sleeps on a latch; from
    // inside, it keeps half of the work and the other workers steal the rest. Measured on the
    // 2-core CI machine (criterion `step`, tiny b2): 466 -> 395 ms per step.
    // Constraints this places on the code: nothing may inject rayon work from another thread
    // and wait for it while the command blocks (with one rayon thread that would deadlock; the
    // pipeline's threads and tokio never use rayon), and the pool is built here, once: its
    // workers get the main thread's 8 MiB of stack (threads default to 2 MiB) and
    // RAYON_NUM_THREADS still sets their number.
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(8 << 20);
    if let Some(threads) = threads_per_local_process() {
        pool = pool.num_threads(threads);
    }
    let _already_built = pool.build_global();
    rayon::scope(|_| dispatch(cli))
}

/// Several data-parallel processes on this machine (their launcher says how many) share its
/// cores: each gets its part, unless RAYON_NUM_THREADS says otherwise.
fn threads_per_local_process() -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let local = crate::dist::launch::local_processes()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / local).max(1))
}

/// Runs one parsed command.
fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => run::run_command(RunArgs {
            device: "cpu".into(),
            metrics_addr: "127.0.0.1:9464".into(),
            data_dir: "data".into(),
            ..RunArgs::default()
        }),
        Some(Command::Run(a)) => run::run_command(a),
        Some(Command::Export(a)) => export::export_command(&a),
        Some(Command::Bench(a)) => bench::bench_command(&a),
        Some(Command::Tokens(a)) => tokens::tokens_command(&a),
        Some(Command::GpuCheck(a)) => gpu_check::gpu_check_command(&a),
        Some(Command::Features(a)) => eval::features_command(&a),
        Some(Command::Eval(EvalCommand::Knn(a))) => eval::knn_command(&a),
        Some(Command::Eval(EvalCommand::Linear(a))) => eval::linear_command(&a),
    }
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
