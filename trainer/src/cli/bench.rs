//! `trainer bench`: the whole training step on a device, on synthetic batches and through the
//! real pipeline.

use std::path::PathBuf;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;

use super::device::{DeviceKind, OnBackend, on_device};
use crate::builtin::{self, BuiltinData};
use crate::config::RunConfig;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Run config (default: the built-in micro config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shards for the pipeline phase (default: the built-in photo-like set, data/builtin-shards:
    /// ~500 px JPEGs, realistic decode costs).
    #[arg(long)]
    pub shards: Option<String>,
    /// cpu, cuda[:N], wgpu[:N] or wgpu:cpu.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed steps per phase.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Root of the built-in data.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// The device's peak dense throughput in the run's precision, in TFLOP/s, for the model
    /// FLOP utilisation (e.g. H100/H200 SXM bf16: 989; without it MFU is not printed).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Skip the real-pipeline phase (compute only).
    #[arg(long)]
    pub synthetic_only: bool,
}

pub(super) fn bench_command(a: &BenchArgs) -> anyhow::Result<()> {
    let text = match &a.config {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => super::MICRO_CONFIG.to_string(),
    };
    let config = RunConfig::resolve(Some(&text), &a.sets)?;
    let shards = match &a.shards {
        Some(s) => s.clone(),
        None if a.synthetic_only => String::new(),
        None => builtin::ensure(&BuiltinData::photos_under(&a.data_dir), &mut |l| println!("{l}"))?
            .to_string_lossy()
            .into_owned(),
    };
    let scratch = std::env::temp_dir().join(format!("cae-bench-{}", std::process::id()));
    let flops = crate::flops::train_flops_per_image(&config.model);
    if !a.json {
        println!(
            "bench: preset {:?}, target {:?}, batch {}, {}, {} timed steps after {} warmup, device {}; {:.2} GFLOP per image",
            config.preset,
            config.model.target,
            config.data.batch_size,
            format!("{:?}", config.precision.dtype).to_lowercase(),
            a.steps,
            a.warmup,
            a.device,
            flops / 1e9
        );
    }
    let (syn, pipe) =
        on_device(DeviceKind::from_flag(&a.device)?, Bench { config: &config, shards: &shards, a, scratch })?;
    let summarize = |log: &[crate::train::StepLog]| crate::bench::summarize(log, a.warmup, flops, a.peak_tflops);
    let (syn, pipe) = (summarize(&syn), pipe.as_deref().map(summarize));
    if a.json {
        let j = serde_json::json!({
            "preset": format!("{:?}", config.preset).to_lowercase(), "device": a.device,
            "precision": format!("{:?}", config.precision.dtype).to_lowercase(), "batch": config.data.batch_size,
            "target": format!("{:?}", config.model.target).to_lowercase(), "flops_per_image": flops,
            "peak_tflops": a.peak_tflops, "synthetic": syn, "pipeline": pipe,
        });
        println!("{j}");
        return Ok(());
    }
    let show = |name: &str, r: &crate::bench::BenchResult| {
        let mfu = r.mfu.map_or(String::new(), |m| format!(", MFU {:.1}%", 100.0 * m));
        println!(
            "{name}: {:.3} s/step, {:.1} images/s, data wait {:.2}% of step time, {:.2} host syncs/step, {:.3} TFLOP/s{mfu}",
            r.seconds_per_step,
            r.images_per_second,
            100.0 * r.data_wait_fraction,
            r.host_syncs_per_step,
            r.tflops
        )
    };
    show("synthetic (compute only)", &syn);
    if let Some(p) = &pipe {
        show("real pipeline           ", p);
        println!("pipeline / synthetic throughput: {:.2}", p.images_per_second / syn.images_per_second.max(1e-12));
    }
    Ok(())
}

type Logs = (Vec<crate::train::StepLog>, Option<Vec<crate::train::StepLog>>);

struct Bench<'a> {
    config: &'a RunConfig,
    shards: &'a str,
    a: &'a BenchArgs,
    scratch: PathBuf,
}

impl OnBackend for Bench<'_> {
    type Output = Logs;
    fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<Logs> {
        let Bench { config, shards, a, scratch } = self;
        let syn = crate::bench::synthetic::<Autodiff<B>>(config, a.warmup, a.steps, scratch.join("synthetic"), device)?;
        let pipe = if a.synthetic_only {
            None
        } else {
            Some(crate::bench::pipeline::<Autodiff<B>>(
                config,
                shards,
                a.warmup,
                a.steps,
                scratch.join("pipeline"),
                device,
            )?)
        };
        let _ = std::fs::remove_dir_all(&scratch);
        Ok((syn, pipe))
    }
}
