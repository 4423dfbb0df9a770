//! The cubecl GPU code path (shared by burn-cuda and burn-wgpu) without a GPU: burn-wgpu on
//! Mesa's software Vulkan driver (llvmpipe, Debian `mesa-vulkan-drivers`), as CI runs it.
//!
//! `cargo test -p cae-trainer --features wgpu --test wgpu`. Without a Vulkan adapter the tests
//! say so and pass, unless `CAE_REQUIRE_WGPU=1` (CI) makes that a failure.
#![cfg(feature = "wgpu")]

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Flex, Wgpu};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use cae_trainer::config::RunConfig;
use cae_trainer::gpu_check::{HostBatch, check_config, loss_of, reference_weights};
use cae_trainer::train::{self, RunOptions, STEP_LOG, read_step_log};

mod common;
use common::shards;

/// The software adapter, or `None` (after saying why) when there is no Vulkan driver.
fn device() -> Option<WgpuDevice> {
    let dev = WgpuDevice::Cpu;
    let probe = std::panic::catch_unwind(|| {
        let t = Tensor::<Wgpu, 1>::from_floats([1.0, 2.0], &WgpuDevice::Cpu);
        t.sum().into_scalar()
    });
    match probe {
        Ok(v) if v == 3.0 => Some(dev),
        other => {
            let why = format!("no usable wgpu software adapter (Vulkan): {:?}", other.err().map(|_| "panicked"));
            if std::env::var("CAE_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("{why}; install mesa-vulkan-drivers");
            }
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// Same weights and batch on the CPU (burn-flex) and on wgpu: the micro preset's loss agrees
/// within 1e-4 relative.
#[test]
fn wgpu_loss_equals_the_cpu_loss() {
    let Some(dev) = device() else { return };
    let cfg = check_config("micro").unwrap();
    let weights = reference_weights::<Flex>(&cfg, 3, &Default::default()).unwrap();
    let batch = HostBatch::new(&cfg, 4, 9);
    let cpu = loss_of::<Flex>(&cfg, &weights, &batch, &Default::default()).unwrap();
    let gpu = loss_of::<Wgpu>(&cfg, &weights, &batch, &dev).unwrap();
    let rel = ((gpu - cpu) / cpu).abs();
    println!("micro loss: cpu {cpu}, wgpu {gpu}, relative difference {rel:.2e}");
    assert!(rel < 1e-4, "cpu {cpu} vs wgpu {gpu}: {rel:.2e}");
}

/// The erf GELU's gradient on the cubecl backend is the exact one (burn's own gelu backward
/// there is the tanh approximation's derivative, up to ~1e-3 off).
#[test]
fn wgpu_gelu_gradient_is_exact() {
    let Some(dev) = device() else { return };
    let xs: Vec<f32> = (-300..=300).map(|i| i as f32 / 100.0).collect();
    let x = Tensor::<Autodiff<Wgpu>, 1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &dev).require_grad();
    let grads = cae_trainer::model::fused::gelu(x.clone()).sum().backward();
    let dx: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
    let erf = |x: f64| libm_erf(x);
    let worst = xs
        .iter()
        .zip(&dx)
        .map(|(&x, &d)| {
            let x = x as f64;
            let exact = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
                + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (d as f64 - exact).abs()
        })
        .fold(0.0, f64::max);
    assert!(worst < 2e-5, "max |dGELU - exact| {worst}");
}

/// erf in f64, independent of the code under test: the Maclaurin series below 2.5, erfc's
/// continued fraction above (both far more accurate than the f32 values compared).
fn libm_erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series: 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)).
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc continued fraction (Lentz), for the tail.
        let z = x.abs();
        let mut f = z;
        for k in (1..60).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        let erfc = (-z * z).exp() / (std::f64::consts::PI.sqrt() * f);
        (1.0 - erfc).copysign(x)
    }
}

/// 20 micro steps of `trainer run` on wgpu train without a NaN, in f32 and in each half type the
/// driver supports (it says which).
#[test]
fn wgpu_trains_micro_in_f32_and_supported_half_types() {
    let Some(dev) = device() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path());
    let mut dtypes = vec!["f32"];
    for (name, dt) in [("bf16", DType::BF16), ("f16", DType::F16)] {
        let ok = <Wgpu as Backend>::supports_dtype(&dev, dt);
        println!("wgpu software adapter supports {name}: {ok}");
        if ok {
            dtypes.push(name);
        }
    }
    if !<Wgpu as Backend>::supports_dtype(&dev, DType::BF16) {
        // An unsupported autocast type is a clear config error at start, not a kernel panic.
        let sets = ["model.target=\"pixels\"", "precision.dtype=\"bf16\"", "schedule.total_steps=1"].map(String::from);
        let config = RunConfig::resolve(None, &sets).unwrap();
        let opts = RunOptions {
            run_dir: tmp.path().join("bf16"),
            shards: data.to_string_lossy().into_owned(),
            resume: None,
            ..RunOptions::default()
        };
        let e = train::run::<Autodiff<Wgpu>>(&config, &opts, &dev).unwrap_err().to_string();
        assert!(e.contains("Bf16") && e.contains("not supported by this device"), "{e}");
    }
    for dtype in dtypes {
        let sets: Vec<String> = [
            "model.target=\"pixels\"".to_string(),
            "data.batch_size=4".into(),
            "data.workers=1".into(),
            "schedule.total_steps=20".into(),
            "checkpoint.every=0".into(),
            format!("precision.dtype=\"{dtype}\""),
        ]
        .to_vec();
        let config = RunConfig::resolve(None, &sets).unwrap();
        let dir = tmp.path().join(dtype);
        let opts = RunOptions {
            run_dir: dir.clone(),
            shards: data.to_string_lossy().into_owned(),
            resume: None,
            ..RunOptions::default()
        };
        let s = train::run::<Autodiff<Wgpu>>(&config, &opts, &dev).unwrap();
        assert_eq!(s.end_step, 20, "{dtype}");
        let log = read_step_log(&dir.join(STEP_LOG)).unwrap();
        assert!(log.iter().all(|l| l.loss.is_finite()), "{dtype}: {log:?}");
        let (first, last) = (log[0].loss, log[19].loss);
        println!("wgpu {dtype}: loss {first:.4} -> {last:.4}");
        assert!(last < first, "{dtype}: loss {first} -> {last}");
    }
}
