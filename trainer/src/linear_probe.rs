//! The linear probe of `trainer eval linear`: a linear classifier on frozen features, the
//! standard MAE/CAE evaluation beside k-NN.
//!
//! Features are normalised per dimension with the training set's mean and standard deviation (a
//! BatchNorm without affine parameters, as the MAE/CAE probe puts before its linear head). The
//! classifier (`W` `[d, classes]`, `b`, zero-initialised: the problem is convex) is trained with
//! Adam on softmax cross-entropy in mini-batches of 256, batches drawn from one seed. The
//! learning rate is chosen from [`LR_GRID`] on a held-out fifth of the training split; the
//! classifier is then trained again on the whole split with that rate and evaluated on the
//! validation set (top-1, top-5). Every fit makes at least [`MIN_STEPS`] optimizer steps (more
//! epochs than asked on a small set).

use burn::module::{AutodiffModule, Module, Param};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::CaeError;

/// Learning rates tried on the held-out part of the training split.
pub const LR_GRID: [f64; 4] = [1e-3, 3e-3, 1e-2, 3e-2];
const BATCH: usize = 256;
/// Fewest optimizer steps of one fit: on a small set `epochs` alone would stop the classifier
/// far from convergence (50 epochs of 1,000 samples are 200 steps), and an under-trained probe
/// ranks representations by how fast they are fitted, not by what they hold.
pub const MIN_STEPS: usize = 2000;

/// Epochs of one fit on `n` samples: `epochs`, or more to make [`MIN_STEPS`] steps.
fn epochs_for(epochs: usize, n: usize) -> usize {
    let batches = n.div_ceil(BATCH).max(1);
    epochs.max(MIN_STEPS.div_ceil(batches))
}

/// What the probe measured.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeResult {
    pub top1: f64,
    pub top5: f64,
    /// The learning rate chosen on the held-out split, and its held-out top-1.
    pub lr: f64,
    pub heldout_top1: f64,
    /// Epochs of the final fit (the requested ones, or more to make [`MIN_STEPS`] steps).
    pub epochs: usize,
    pub train_samples: usize,
    pub val_samples: usize,
    pub classes: usize,
}

#[derive(Module, Debug)]
struct Linear<B: Backend> {
    weight: Param<Tensor<B, 2>>,
    bias: Param<Tensor<B, 1>>,
}

/// Labelled rows of a `[n, d]` feature matrix (rows with label < 0 dropped).
struct Set {
    x: Vec<f32>,
    y: Vec<i64>,
}

impl Set {
    fn new(x: &[f32], y: &[i64], d: usize) -> Self {
        let keep: Vec<usize> = (0..y.len()).filter(|&i| y[i] >= 0).collect();
        Self {
            x: keep.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect(),
            y: keep.iter().map(|&i| y[i]).collect(),
        }
    }
    fn rows(&self, idx: &[usize], d: usize) -> Set {
        Set {
            x: idx.iter().flat_map(|&i| self.x[i * d..(i + 1) * d].iter().copied()).collect(),
            y: idx.iter().map(|&i| self.y[i]).collect(),
        }
    }
}

/// Per-dimension mean and 1/std of `x` `[n, d]`.
fn moments(x: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = (x.len() / d.max(1)).max(1) as f64;
    let mut mean = vec![0.0; d];
    for row in x.chunks(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64 / n;
        }
    }
    let mut var = vec![0.0; d];
    for row in x.chunks(d) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (v as f64 - m).powi(2) / n;
        }
    }
    (mean, var.into_iter().map(|v| 1.0 / (v + 1e-6).sqrt()).collect())
}

fn normalise(x: &mut [f32], d: usize, mean: &[f64], inv_std: &[f64]) {
    for row in x.chunks_mut(d) {
        for ((v, m), s) in row.iter_mut().zip(mean).zip(inv_std) {
            *v = ((*v as f64 - m) * s) as f32;
        }
    }
}

/// Trains the classifier on `train` for `epochs` epochs at `lr`.
fn fit<B: AutodiffBackend>(
    train: &Set,
    d: usize,
    classes: usize,
    lr: f64,
    epochs: usize,
    seed: u64,
    device: &B::Device,
) -> Linear<B::InnerBackend> {
    let mut model = Linear::<B> {
        weight: Param::from_tensor(Tensor::zeros([d, classes], device)),
        bias: Param::from_tensor(Tensor::zeros([classes], device)),
    };
    let mut opt = AdamConfig::new().init::<B, Linear<B>>();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..train.y.len()).collect();
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(BATCH) {
            let b = train.rows(chunk, d);
            let x = Tensor::<B, 2>::from_data(TensorData::new(b.x, [chunk.len(), d]), device);
            let y = Tensor::<B, 1, Int>::from_data(TensorData::new(b.y, [chunk.len()]), device);
            let logits = x.matmul(model.weight.val()) + model.bias.val().unsqueeze::<2>(); // [n, c]
            let logp = burn::tensor::activation::log_softmax(logits, 1);
            let loss = -logp.gather(1, y.unsqueeze_dim::<2>(1)).mean(); // [1]
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step(lr, model, grads);
        }
    }
    model.valid()
}

/// Top-1 and top-5 accuracy of `model` on `set`.
fn accuracy<B: Backend>(model: &Linear<B>, set: &Set, d: usize, device: &B::Device) -> Result<(f64, f64), CaeError> {
    let n = set.y.len();
    if n == 0 {
        return Ok((0.0, 0.0));
    }
    let x = Tensor::<B, 2>::from_data(TensorData::new(set.x.clone(), [n, d]), device);
    let logits = x.matmul(model.weight.val()) + model.bias.val().unsqueeze::<2>(); // [n, c]
    let c = logits.dims()[1];
    let scores = crate::readback::read_f64s(logits)?;
    let (mut top1, mut top5) = (0usize, 0usize);
    for (row, &y) in scores.chunks(c).zip(&set.y) {
        let truth = row[y as usize];
        // Rank of the true class: how many classes score strictly higher (ties favour it).
        let above = row.iter().filter(|&&s| s > truth).count();
        top1 += usize::from(above == 0);
        top5 += usize::from(above < 5);
    }
    Ok((top1 as f64 / n as f64, top5 as f64 / n as f64))
}

/// The linear probe: `train` and `val` are `[n, d]` row-major features with their labels
/// (label < 0: unlabelled, dropped).
#[allow(clippy::too_many_arguments)]
pub fn linear_probe<B: AutodiffBackend>(
    train: &[f32],
    train_labels: &[i64],
    val: &[f32],
    val_labels: &[i64],
    d: usize,
    epochs: usize,
    seed: u64,
    device: &B::Device,
) -> Result<ProbeResult, CaeError> {
    let (mut tr, mut va) = (Set::new(train, train_labels, d), Set::new(val, val_labels, d));
    if tr.y.len() < 5 || va.y.is_empty() {
        return Err(CaeError::Data(format!(
            "linear probe: {} labelled training and {} validation samples (need >= 5 and >= 1)",
            tr.y.len(),
            va.y.len()
        )));
    }
    let classes = tr.y.iter().chain(&va.y).copied().max().unwrap_or(0) as usize + 1;
    let (mean, inv_std) = moments(&tr.x, d);
    normalise(&mut tr.x, d, &mean, &inv_std);
    normalise(&mut va.x, d, &mean, &inv_std);

    // Learning rate from a held-out fifth of the training split.
    let mut idx: Vec<usize> = (0..tr.y.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed));
    let cut = (idx.len() / 5).max(1);
    let (held, fit_idx) = idx.split_at(cut);
    let (held, fit_set) = (tr.rows(held, d), tr.rows(fit_idx, d));
    let mut best = (f64::NEG_INFINITY, LR_GRID[0]);
    for lr in LR_GRID {
        let m = fit::<B>(&fit_set, d, classes, lr, epochs_for(epochs, fit_set.y.len()), seed, device);
        let (t1, _) = accuracy(&m, &held, d, device)?;
        if t1 > best.0 {
            best = (t1, lr);
        }
    }
    let epochs = epochs_for(epochs, tr.y.len());
    let model = fit::<B>(&tr, d, classes, best.1, epochs, seed, device);
    let (top1, top5) = accuracy(&model, &va, d, device)?;
    Ok(ProbeResult {
        top1,
        top5,
        lr: best.1,
        heldout_top1: best.0,
        epochs,
        train_samples: tr.y.len(),
        val_samples: va.y.len(),
        classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use rand::RngExt;

    /// Gaussian blobs: `classes` centres `sep` apart in `d` dimensions, plus noise; `shuffled`
    /// scrambles the labels (nothing to learn).
    fn blobs(n: usize, d: usize, classes: usize, sep: f32, seed: u64, shuffled: bool) -> (Vec<f32>, Vec<i64>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % classes;
            for j in 0..d {
                let centre = if j % classes == c { sep } else { 0.0 };
                x.push(centre + rng.random_range(-1.0f32..1.0) + 5.0 * j as f32);
            }
            y.push(if shuffled { rng.random_range(0..classes as i64) } else { c as i64 });
        }
        (x, y)
    }

    #[test]
    fn separable_features_are_learned_and_random_labels_are_not() {
        let dev = Default::default();
        let (d, k) = (12, 4);
        let (tx, ty) = blobs(400, d, k, 1.5, 1, false);
        let (vx, vy) = blobs(200, d, k, 1.5, 2, false);
        let r = linear_probe::<Autodiff<Flex>>(&tx, &ty, &vx, &vy, d, 20, 0, &dev).unwrap();
        assert_eq!((r.classes, r.train_samples, r.val_samples), (k, 400, 200));
        assert!(r.top1 > 0.85, "separable blobs: top-1 {}", r.top1);
        assert!(r.top5 >= r.top1 && LR_GRID.contains(&r.lr));
        // Unlabelled rows are dropped.
        let mut ty2 = ty.clone();
        ty2[..100].fill(-1);
        let r2 = linear_probe::<Autodiff<Flex>>(&tx, &ty2, &vx, &vy, d, 5, 0, &dev).unwrap();
        assert_eq!(r2.train_samples, 300);
        // Random labels: chance (1/4), with margin for the 200 validation samples.
        let (rx, ry) = blobs(400, d, k, 1.5, 3, true);
        let (qx, qy) = blobs(200, d, k, 1.5, 4, true);
        let chance = linear_probe::<Autodiff<Flex>>(&rx, &ry, &qx, &qy, d, 20, 0, &dev).unwrap();
        assert!(chance.top1 < 0.40, "random labels: top-1 {}", chance.top1);
        // Deterministic.
        let again = linear_probe::<Autodiff<Flex>>(&tx, &ty, &vx, &vy, d, 20, 0, &dev).unwrap();
        assert_eq!((again.top1, again.lr), (r.top1, r.lr));
    }
}
