//! `trainer gpu-check`: the same weights and batch on the CPU reference and on a device; the
//! losses must agree; then the device's forward + backward throughput.

use anyhow::bail;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;

use super::device::{DeviceKind, OnBackend, on_device};

#[derive(Args, Debug)]
pub struct GpuCheckArgs {
    /// Model preset: base, small, tiny or micro.
    #[arg(long, default_value = "base")]
    pub preset: String,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// f32, f16 or bf16 on the device (the CPU reference is always f32).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Timed forward + backward steps on the device.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// cpu (checks the CPU against itself), cuda[:N] or wgpu[:N|cpu].
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub(super) fn gpu_check_command(a: &GpuCheckArgs) -> anyhow::Result<()> {
    use crate::gpu_check::{HostBatch, check_config, loss_of, reference_weights};
    let cfg = check_config(&a.preset)?;
    let cpu = Default::default();
    let weights = reference_weights::<burn::backend::Flex>(&cfg, a.seed, &cpu)?;
    let batch = HostBatch::new(&cfg, a.batch, a.seed);
    let t = std::time::Instant::now();
    let cpu_loss = loss_of::<burn::backend::Flex>(&cfg, &weights, &batch, &cpu)?;
    let cpu_seconds = t.elapsed().as_secs_f64();
    let dtype = crate::precision::Dtype::parse(&a.precision)?;
    let job = DeviceCheck { cfg: &cfg, weights: &weights, batch: &batch, steps: a.steps, dtype };
    let (device_loss, timing) = on_device(DeviceKind::from_flag(&a.device)?, job)?;
    let rel = ((device_loss - cpu_loss) / cpu_loss).abs();
    let tolerance = if a.precision == "f32" { 1e-3 } else { 2e-2 };
    let j = serde_json::json!({
        "preset": a.preset, "batch": a.batch, "precision": a.precision, "device": a.device,
        "cpu_loss": cpu_loss, "cpu_forward_seconds": cpu_seconds, "device_loss": device_loss,
        "relative_difference": rel, "tolerance": tolerance, "agree": rel <= tolerance,
        "steps": timing.steps, "seconds": timing.seconds, "images_per_second": timing.images_per_second,
    });
    println!("{j}");
    if rel > tolerance {
        bail!("device loss {device_loss} differs from the CPU reference {cpu_loss} by {rel:.2e} (> {tolerance})");
    }
    Ok(())
}

/// The loss and the timed steps on the device, under the autocast of `dtype`.
struct DeviceCheck<'a> {
    cfg: &'a crate::model::CaeConfig,
    weights: &'a [u8],
    batch: &'a crate::gpu_check::HostBatch,
    steps: usize,
    dtype: crate::precision::Dtype,
}

impl OnBackend for DeviceCheck<'_> {
    type Output = (f64, crate::gpu_check::StepTiming);
    fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<Self::Output> {
        use crate::gpu_check::{loss_of, time_steps};
        let DeviceCheck { cfg, weights, batch, steps, dtype } = self;
        let loss = crate::amp::autocast(dtype, || loss_of::<B>(cfg, weights, batch, device))?;
        let timing = crate::amp::autocast(dtype, || time_steps::<Autodiff<B>>(cfg, weights, batch, steps, device))?;
        Ok((loss, timing))
    }
}
