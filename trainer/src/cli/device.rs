//! `--device`: where a command runs, and the one place that maps it to a burn backend.
//!
//! - `cpu`: burn-flex (SIMD kernels, rayon), always built.
//! - `cuda`, `cuda:N`: burn-cuda with fusion and autotune (cargo feature `cuda`).
//! - `wgpu`, `wgpu:N`, `wgpu:cpu`: burn-wgpu with fusion and autotune (cargo feature `wgpu`):
//!   Vulkan on Linux (Metal on macOS, DX12 on Windows), so AMD, Intel and Apple GPUs too.
//!   `wgpu` takes the default adapter (`CUBECL_WGPU_DEFAULT_DEVICE` can name another), `wgpu:N`
//!   the N-th discrete GPU, `wgpu:cpu` a software adapter (Mesa's llvmpipe).
//!
//! Every backend runs in f32 (master weights); `precision.dtype` selects the autocast type of
//! the products ([`crate::amp`]).

use burn::tensor::backend::Backend;

/// Where a command executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda(usize),
    Wgpu(WgpuAdapter),
}

/// Which wgpu adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgpuAdapter {
    Default,
    Discrete(usize),
    Cpu,
}

impl DeviceKind {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let index = |rest: &str| rest.parse::<usize>().ok();
        Ok(match s {
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            "wgpu" => Self::Wgpu(WgpuAdapter::Default),
            "wgpu:cpu" => Self::Wgpu(WgpuAdapter::Cpu),
            _ => match (s.strip_prefix("cuda:").and_then(index), s.strip_prefix("wgpu:").and_then(index)) {
                (Some(n), _) => Self::Cuda(n),
                (_, Some(n)) => Self::Wgpu(WgpuAdapter::Discrete(n)),
                _ => super::usage!("--device {s:?}: expected cpu, cuda, cuda:N, wgpu, wgpu:N or wgpu:cpu"),
            },
        })
    }

    /// A data-parallel rank's device: `cuda` or `wgpu` without an index (`flag` as given)
    /// means the GPU of the rank's local rank; an explicit index or the CPU stays.
    pub fn for_local_rank(self, flag: &str, local_rank: usize) -> Self {
        match (self, flag) {
            (Self::Cuda(_), "cuda") => Self::Cuda(local_rank),
            (Self::Wgpu(WgpuAdapter::Default), "wgpu") => Self::Wgpu(WgpuAdapter::Discrete(local_rank)),
            (kind, _) => kind,
        }
    }

    /// The `--device` spelling of this device.
    pub fn name(self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Cuda(n) => format!("cuda:{n}"),
            Self::Wgpu(WgpuAdapter::Default) => "wgpu".into(),
            Self::Wgpu(WgpuAdapter::Discrete(n)) => format!("wgpu:{n}"),
            Self::Wgpu(WgpuAdapter::Cpu) => "wgpu:cpu".into(),
        }
    }

    /// Whether this is the CPU backend.
    pub fn is_cpu(self) -> bool {
        self == Self::Cpu
    }

    /// `--device` parsed, and checked to be built into this binary (both usage errors).
    pub fn from_flag(s: &str) -> anyhow::Result<Self> {
        let kind = Self::parse(s)?;
        kind.check_built()?;
        Ok(kind)
    }

    /// A usage error (exit 2) when this binary was built without the backend the device needs:
    /// checked before a command creates anything.
    pub fn check_built(self) -> anyhow::Result<()> {
        let feature = match self {
            Self::Cuda(_) if !cfg!(feature = "cuda") => "cuda",
            Self::Wgpu(_) if !cfg!(feature = "wgpu") => "wgpu",
            _ => return Ok(()),
        };
        super::usage!(
            "--device {feature}: this trainer was built without {feature}: \
             cargo build --release -p cae-trainer --features {feature}"
        )
    }
}

/// A command body generic over the backend (the CLI's commands implement it once; [`on_device`]
/// instantiates it for the backend `--device` names). Training wraps `B` in `Autodiff<B>`.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, device: &B::Device) -> anyhow::Result<Self::Output>;
}

/// Runs `job` on the backend of `kind`.
pub fn on_device<J: OnBackend>(kind: DeviceKind, job: J) -> anyhow::Result<J::Output> {
    match kind {
        DeviceKind::Cpu => job.run::<burn::backend::Flex>(&Default::default()),
        DeviceKind::Cuda(index) => cuda(job, index),
        DeviceKind::Wgpu(adapter) => wgpu(job, adapter),
    }
}

#[cfg(feature = "cuda")]
fn cuda<J: OnBackend>(job: J, index: usize) -> anyhow::Result<J::Output> {
    job.run::<burn::backend::Cuda>(&burn::backend::cuda::CudaDevice { index })
}

#[cfg(not(feature = "cuda"))]
fn cuda<J: OnBackend>(_job: J, _index: usize) -> anyhow::Result<J::Output> {
    anyhow::bail!("this trainer was built without CUDA: cargo build --release -p cae-trainer --features cuda")
}

#[cfg(feature = "wgpu")]
fn wgpu<J: OnBackend>(job: J, adapter: WgpuAdapter) -> anyhow::Result<J::Output> {
    use burn::backend::wgpu::WgpuDevice;
    let device = match adapter {
        WgpuAdapter::Default => WgpuDevice::DefaultDevice,
        WgpuAdapter::Discrete(n) => WgpuDevice::DiscreteGpu(n),
        WgpuAdapter::Cpu => WgpuDevice::Cpu,
    };
    job.run::<burn::backend::Wgpu>(&device)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu<J: OnBackend>(_job: J, _adapter: WgpuAdapter) -> anyhow::Result<J::Output> {
    anyhow::bail!("this trainer was built without wgpu: cargo build --release -p cae-trainer --features wgpu")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(DeviceKind::parse("cpu").unwrap(), DeviceKind::Cpu);
        assert_eq!(DeviceKind::parse("cuda").unwrap(), DeviceKind::Cuda(0));
        assert_eq!(DeviceKind::parse("cuda:3").unwrap(), DeviceKind::Cuda(3));
        assert_eq!(DeviceKind::parse("wgpu").unwrap(), DeviceKind::Wgpu(WgpuAdapter::Default));
        assert_eq!(DeviceKind::parse("wgpu:1").unwrap(), DeviceKind::Wgpu(WgpuAdapter::Discrete(1)));
        assert_eq!(DeviceKind::parse("wgpu:cpu").unwrap(), DeviceKind::Wgpu(WgpuAdapter::Cpu));
        if !cfg!(feature = "cuda") {
            let e = DeviceKind::Cuda(0).check_built().unwrap_err();
            assert_eq!(super::super::exit_code(&e), 2, "a usage error");
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
        DeviceKind::Cpu.check_built().unwrap();
        for bad in ["gpu", "cuda:x", "wgpu:", "cuda:-1"] {
            let e = DeviceKind::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("wgpu:N"), "{e}");
        }
    }

    #[test]
    fn a_rank_without_a_device_index_takes_its_local_rank() {
        let on = |flag: &str| DeviceKind::parse(flag).unwrap().for_local_rank(flag, 3).name();
        assert_eq!(on("cuda"), "cuda:3");
        assert_eq!(on("wgpu"), "wgpu:3");
        assert_eq!(on("cuda:1"), "cuda:1", "an explicit index stays");
        assert_eq!(on("cpu"), "cpu");
        assert_eq!(on("wgpu:cpu"), "wgpu:cpu");
    }

    /// The dispatcher hands the job the backend it names.
    #[test]
    fn cpu_jobs_run_on_flex() {
        struct Name;
        impl OnBackend for Name {
            type Output = String;
            fn run<B: Backend>(self, _device: &B::Device) -> anyhow::Result<String> {
                Ok(B::name(&Default::default()))
            }
        }
        let name = on_device(DeviceKind::Cpu, Name).unwrap();
        assert_eq!(name, burn::backend::Flex::name(&Default::default()));
        #[cfg(not(feature = "cuda"))]
        assert!(on_device(DeviceKind::Cuda(0), Name).unwrap_err().to_string().contains("--features cuda"));
    }
}
