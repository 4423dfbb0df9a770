//! One CAE training step (forward + backward, pixel target, no optimizer) on the CPU backend, for
//! the `micro` and `tiny` presets. Compare with `tools/py/bench_step_torch.py` (PyTorch eager,
//! same shapes, same thread count): `cargo bench -p cae-trainer --bench step`.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};
use cae_pipeline::Batch;
use cae_trainer::model::{Cae, CaeConfig, CaeTargets, mask_index_tensors, pixel_targets};
use criterion::{Criterion, criterion_group, criterion_main};

type AB = Autodiff<Flex>;

fn bench_preset(c: &mut Criterion, name: &str, mut cfg: CaeConfig, batch: usize) {
    cfg.target = cae_trainer::model::TargetKind::Pixels;
    let dev = Default::default();
    let model = Cae::<AB>::new(&cfg, &dev).expect("model");
    let s = cfg.img_size;
    let grid = s / cfg.patch_size;
    let n = grid * grid;
    let images = Tensor::<AB, 4>::random([batch, 3, s, s], Distribution::Normal(0.0, 1.0), &dev);
    let targets = CaeTargets::Pixels(pixel_targets(images.clone(), cfg.patch_size));
    let mask = Batch::synthetic(batch, 1, 1, grid, cfg.num_mask, 0).mask_bool();
    let (vis, msk) = mask_index_tensors::<AB>(&mask, batch, n, cfg.num_mask, &dev).expect("mask");
    let mut group = c.benchmark_group("cae_step");
    group.sample_size(10);
    group.bench_function(format!("{name}_b{batch}"), |bch| {
        // On a worker of the rayon pool, as `trainer` runs its commands (see `cli::main_from`).
        bch.iter(|| {
            rayon::scope(|_| {
                let out = model.forward(images.clone(), vis.clone(), msk.clone(), &targets).expect("forward");
                let grads = out.loss.backward();
                std::hint::black_box(grads);
            })
        })
    });
    group.finish();
}

fn steps(c: &mut Criterion) {
    bench_preset(c, "micro", CaeConfig::micro(), 8);
    bench_preset(c, "tiny", CaeConfig::tiny(), 2);
}

criterion_group!(benches, steps);
criterion_main!(benches);
