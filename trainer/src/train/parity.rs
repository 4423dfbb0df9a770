//! Step parity with an independent PyTorch reference of the spec (`tools/py/
//! make_step_parity_golden.py`, goldens in `trainer/tests/golden/parity/`): the same initial
//! weights (an mmselfsup-layout `.pth`, through our importer) and the same batches (normalised
//! images, masks, DALL-E token targets), 10 optimizer steps of the micro CAE through the step
//! loop's own pieces ([`MicroBatch`], [`prepare_update`], [`CaeOptimizer::apply`],
//! [`LrSchedule`]) give the reference's losses, gradient norms and weights. The reference runs
//! in float64 from the same f32 inputs; the tolerances are those an f32 PyTorch run of the same
//! script lands within (`f32_torch_vs_reference` in its `config.json`), with headroom.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Int, Tensor, TensorData};

use super::steps::{MicroBatch, prepare_update};
use crate::model::{Cae, CaeConfig, CaeTargets};
use crate::optim::{CaeOptimizer, LrSchedule, NoDecayRule, OptimConfig};
use crate::precision::Dtype;
use crate::readback::read_f64s;

type AB = Autodiff<Flex>;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/parity").join(name)
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap()
}

/// The golden batches (all of them, batch-major): images, visible, masked, tokens.
struct Batches {
    images: Vec<f32>,
    visible: Vec<i64>,
    masked: Vec<i64>,
    tokens: Vec<i64>,
}

fn batches() -> Batches {
    let bytes = std::fs::read(golden("batches.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    let i64s = |n: &str| -> Vec<i64> {
        st.tensor(n).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    Batches { images: f32s("images"), visible: i64s("visible"), masked: i64s("masked"), tokens: i64s("tokens") }
}

/// Every trainable float parameter (encoder, regressor, decoder: not the teacher), flattened,
/// in module order.
fn trainable(model: &Cae<AB>) -> Vec<Vec<f32>> {
    struct V(Vec<Vec<f32>>);
    impl ModuleVisitor<AB> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            let t = p.val();
            if t.is_require_grad() {
                self.0.push(t.into_data().convert::<f32>().to_vec::<f32>().unwrap());
            }
        }
    }
    let mut v = V(Vec::new());
    model.visit(&mut v);
    v.0
}

/// Our token targets are per patch `[b, 16]` (the model picks the masked ones): the golden's
/// target of `masked[s, i, j]` at that patch, 0 elsewhere (never read).
fn token_grid<B: burn::tensor::backend::Backend>(
    b: &Batches,
    s: usize,
    bs: usize,
    nm: usize,
    dev: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut grid = vec![0i64; bs * 16];
    for i in 0..bs {
        for j in 0..nm {
            let k = (s * bs + i) * nm + j;
            grid[i * 16 + b.masked[k] as usize] = b.tokens[k];
        }
    }
    Tensor::from_data(TensorData::new(grid, [bs, 16]), dev)
}

fn load(name: &str) -> Cae<AB> {
    let model = Cae::<AB>::new(&CaeConfig::micro(), &Default::default()).unwrap();
    crate::weights::mmselfsup::load_mmselfsup(model, &golden(name)).unwrap().0
}

#[test]
fn ten_steps_match_the_pytorch_reference() {
    let dev = Default::default();
    let cfg = json("config.json");
    let o = &cfg["optimizer"];
    let num = |k: &str| o[k].as_f64().unwrap();
    let betas = o["betas"].as_array().unwrap();
    let optim = OptimConfig {
        beta_1: betas[0].as_f64().unwrap() as f32,
        beta_2: betas[1].as_f64().unwrap() as f32,
        epsilon: num("eps") as f32,
        weight_decay: num("weight_decay") as f32,
        clip_grad_norm: Some(num("clip_max_norm")),
        no_decay: NoDecayRule::Names,
    };
    assert_eq!(CaeConfig::micro().align_weight, num("align_weight"));
    let schedule =
        LrSchedule::new(num("base_lr"), num("min_lr"), num("warmup_iters") as usize, num("total_iters") as usize)
            .unwrap();
    let b = batches();
    let bs = cfg["batch_size"].as_u64().unwrap() as usize;
    let (nv, nm) = (10, 6);
    let mut model = load("init_legacy.pth");
    let mut optimizer = CaeOptimizer::new(&optim, &model);
    let expected = json("expected_losses.json");
    for (t, want) in expected["steps"].as_array().unwrap().iter().enumerate() {
        let s = want["batch"].as_u64().unwrap() as usize;
        let img = TensorData::new(b.images[s * bs * 3 * 64 * 64..(s + 1) * bs * 3 * 64 * 64].to_vec(), [bs, 3, 64, 64]);
        let ints = |v: &[i64], n: usize| {
            Tensor::<Flex, 2, Int>::from_data(TensorData::new(v[s * bs * n..(s + 1) * bs * n].to_vec(), [bs, n]), &dev)
        };
        let pass = MicroBatch { model: &model, dtype: Dtype::F32, accumulation: 1, loss_scale: 1.0 };
        let (grads, losses) = pass
            .run(
                Tensor::from_data(img, &dev),
                ints(&b.visible, nv),
                ints(&b.masked, nm),
                CaeTargets::Tokens(token_grid::<Flex>(&b, s, bs, nm, &dev)),
            )
            .unwrap();
        let (m, grads, norm) = prepare_update(model, &optimizer, grads, 1.0);
        let lr = schedule.lr(t);
        assert!((lr - want["lr"].as_f64().unwrap()).abs() <= 1e-12, "step {}: lr {lr}", t + 1);
        model = optimizer.apply(lr, m, grads);
        let got = read_f64s(Tensor::cat(vec![losses, norm], 0)).unwrap();
        for (i, key) in ["loss", "loss_main", "loss_align", "grad_norm"].iter().enumerate() {
            let w = want[key].as_f64().unwrap();
            assert!((got[i] - w).abs() <= 2e-5 * w.abs().max(1.0), "step {}: {key} {} vs reference {w}", t + 1, got[i]);
        }
    }
    // The final weights, read by the same importer from the reference's state dict. One
    // parameter has a zero gradient up to rounding (its LayerNorm bias shifts every regressor
    // key alike; the softmax cancels it): f32 noise moves it by Adam steps, the f64 reference
    // does not; it is compared loosely.
    let want = trainable(&load("final_legacy.pth"));
    let start = trainable(&load("init_legacy.pth"));
    let got = trainable(&model);
    assert_eq!(got.len(), want.len());
    let mut moved = 0.0f64;
    for (i, ((g, w), s)) in got.iter().zip(&want).zip(&start).enumerate() {
        let err = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let loose = w.iter().zip(s).all(|(a, b)| a == b) && g.len() == 64 && err < 2e-2;
        assert!(err <= 1e-5 || loose, "parameter {i} ({} values): max |ours - reference| = {err:e}", g.len());
        moved = moved.max(f64::from(w.iter().zip(s).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max)));
    }
    assert!(moved > 1e-3, "the reference's weights moved ({moved}): the comparison is of trained weights");
}
