//! Autodiff tests: where gradients flow, the teacher hard copy, and overfitting one batch.

use crate::model::init::with_seed;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData, backend::AutodiffBackend};

use super::{AB, device, images, to_vec};
use crate::model::{
    Cae, CaeConfig, CaeTargets, DalleConfig, TargetKind, map_pixels, mask_index_tensors, pixel_targets,
};

fn micro_mask() -> Vec<bool> {
    let mut m = vec![false; 32];
    for i in [0, 5, 6, 9, 10, 12] {
        m[i] = true;
    }
    for i in [2, 3, 7, 11, 14, 15] {
        m[16 + i] = true;
    }
    m
}

/// (params with a gradient, params without) of a module.
fn grad_split<M: Module<AB>>(module: &M, grads: &<AB as AutodiffBackend>::Gradients) -> (usize, usize) {
    struct V<'a>(&'a <AB as AutodiffBackend>::Gradients, usize, usize);
    impl ModuleVisitor<AB> for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            if p.val().grad(self.0).is_some() { self.1 += 1 } else { self.2 += 1 }
        }
    }
    let mut v = V(grads, 0, 0);
    module.visit(&mut v);
    (v.1, v.2)
}

fn ids<M: Module<AB>>(module: &M) -> Vec<ParamId> {
    struct V(Vec<ParamId>);
    impl ModuleVisitor<AB> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            self.0.push(p.id);
        }
    }
    let mut v = V(Vec::new());
    module.visit(&mut v);
    v.0
}

fn values<M: Module<AB>>(module: &M) -> Vec<f32> {
    struct V(Vec<f32>);
    impl ModuleVisitor<AB> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            self.0.extend(to_vec(p.val()));
        }
    }
    let mut v = V(Vec::new());
    module.visit(&mut v);
    v.0
}

fn distinct(t: &Tensor<AB, 2, Int>) -> usize {
    let mut v = super::to_vec_i64(t.clone());
    v.sort_unstable();
    v.dedup();
    v.len()
}

#[test]
fn gradients_reach_student_only() {
    let dev = device();
    let c = CaeConfig::micro();
    let (model, tok) = with_seed(5, || (Cae::<AB>::new(&c, &dev).unwrap(), DalleConfig::micro().init::<AB>(&dev)));
    let (vis, msk) = mask_index_tensors::<AB>(&micro_mask(), 2, 16, 6, &dev).unwrap();
    let targets = CaeTargets::Tokens(tok.tokens(map_pixels(images::<AB>(2, 32, 6, &dev).clamp(0.0, 1.0))));
    let out = model.forward(images::<AB>(2, 64, 7, &dev), vis, msk, &targets).unwrap();
    let grads = out.loss.backward();

    let (with, without) = grad_split(&model.encoder, &grads);
    assert_eq!((with, without), (ids(&model.encoder).len(), 0), "every encoder parameter gets a gradient");
    let (with, without) = grad_split(&model.regressor, &grads);
    assert_eq!(without, 0, "regressor: {with} with, {without} without");
    let (with, without) = grad_split(&model.decoder, &grads);
    assert_eq!(without, 0, "decoder: {with} with, {without} without");
    assert_eq!(grad_split(&model.teacher, &grads).0, 0, "teacher must get no gradient");
    assert_eq!(grad_split(&tok, &grads).0, 0, "tokenizer must get no gradient");
    assert!(model.encoder.pos_embed.grad(&grads).is_none(), "pos_embed must get no gradient");
    let gp = GradientsParams::from_grads(grads, &model);
    assert_eq!(gp.len(), ids(&model.encoder).len() + ids(&model.regressor).len() + ids(&model.decoder).len());
}

#[test]
fn update_teacher_is_a_hard_copy_with_own_ids_and_one_step_lag() {
    let dev = device();
    let c = CaeConfig::micro();
    let model = with_seed(8, || Cae::<AB>::new(&c, &dev)).unwrap();
    let teacher_ids = ids(&model.teacher);
    let enc_ids = ids(&model.encoder);
    assert!(teacher_ids.iter().all(|id| !enc_ids.contains(id)), "teacher ids must differ from encoder ids");
    assert_eq!(values(&model.teacher), values(&model.encoder), "teacher starts as a copy");

    let (vis, msk) = mask_index_tensors::<AB>(&micro_mask(), 2, 16, 6, &dev).unwrap();
    let targets = CaeTargets::Tokens(Tensor::<AB, 2, Int>::from_data(
        TensorData::new((0..32).map(|i| i as i64 * 13 % 512).collect::<Vec<_>>(), [2, 16]),
        &dev,
    ));
    let mut optim = AdamWConfig::new().init();
    let mut model = model;
    let mut previous_encoder = values(&model.encoder);
    for _ in 0..2 {
        let out = model.forward(images::<AB>(2, 64, 9, &dev), vis.clone(), msk.clone(), &targets).unwrap();
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = model.update_teacher();
        // The copy is taken before the optimizer step...
        assert_eq!(values(&model.teacher), values(&model.encoder));
        model = optim.step(1e-2, model, grads);
        // ...so after the step the teacher holds the previous encoder, and the encoder moved.
        let teacher_now = values(&model.teacher);
        assert_eq!(teacher_now, previous_encoder);
        assert_ne!(values(&model.encoder), teacher_now);
        previous_encoder = values(&model.encoder);
        assert_eq!(ids(&model.teacher), teacher_ids, "teacher ids are stable");
    }
}

#[test]
fn micro_overfits_one_batch() {
    let dev = device();
    let c = CaeConfig::micro();
    let (mut model, tok) = with_seed(99, || (Cae::<AB>::new(&c, &dev).unwrap(), DalleConfig::micro().init::<AB>(&dev)));
    let (vis, msk) = mask_index_tensors::<AB>(&micro_mask(), 2, 16, 6, &dev).unwrap();
    let img = images::<AB>(2, 64, 100, &dev);
    // The random tokenizer maps noise to very few distinct ids, which would make memorising
    // trivial: offset its ids by the patch index so the 12 masked targets are all different.
    let raw = tok.tokens(map_pixels(images::<AB>(2, 32, 101, &dev).clamp(0.0, 1.0)));
    let offset = Tensor::<AB, 1, Int>::arange(0..16, &dev).unsqueeze::<2>().repeat_dim(0, 2) * 37;
    let tokens = (raw + offset).remainder_scalar(512);
    assert!(distinct(&tokens) >= 12);
    let targets = CaeTargets::Tokens(tokens);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut first = None;
    let mut last = f32::MAX;
    for step in 0..200 {
        let out = model.forward(img.clone(), vis.clone(), msk.clone(), &targets).unwrap();
        let loss = to_vec(out.loss.clone())[0];
        assert!(loss.is_finite(), "step {step}: loss {loss}");
        first.get_or_insert(loss);
        last = loss;
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = model.update_teacher();
        model = optim.step(2e-3, model, grads);
    }
    let first = first.unwrap();
    eprintln!("micro overfit: loss {first} -> {last}");
    assert!(last <= 0.1 * first, "loss {first} -> {last}: did not fall by 90%");
}

#[test]
fn pixel_target_loss_trains() {
    let dev = device();
    let c = CaeConfig { target: TargetKind::Pixels, ..CaeConfig::micro() };
    let mut model = with_seed(3, || Cae::<AB>::new(&c, &dev)).unwrap();
    let (vis, msk) = mask_index_tensors::<AB>(&micro_mask(), 2, 16, 6, &dev).unwrap();
    let img = images::<AB>(2, 64, 4, &dev);
    let targets = CaeTargets::Pixels(pixel_targets(img.clone(), 16));
    assert_eq!(model.decoder.head.weight.val().dims(), [64, 768]);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let out = model.forward(img.clone(), vis.clone(), msk.clone(), &targets).unwrap();
        losses.push(to_vec(out.loss_main.clone())[0]);
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = model.update_teacher();
        model = optim.step(2e-3, model, grads);
    }
    // Per-patch-normalised targets have unit variance: MSE starts near 1 and must go down.
    assert!((0.8..1.3).contains(&losses[0]), "initial pixel MSE {}", losses[0]);
    assert!(losses[29] < 0.7 * losses[0], "pixel MSE {} -> {}", losses[0], losses[29]);
}

#[test]
fn record_roundtrip_keeps_teacher_frozen() {
    let dev = device();
    let c = CaeConfig::micro();
    let trained = with_seed(12, || Cae::<AB>::new(&c, &dev)).unwrap();
    let fresh = with_seed(13, || Cae::<AB>::new(&c, &dev)).unwrap();
    assert_ne!(values(&fresh.encoder), values(&trained.encoder));
    let loaded = fresh.load_record(trained.clone().into_record());
    assert_eq!(values(&loaded.encoder), values(&trained.encoder));
    assert_eq!(values(&loaded.teacher), values(&trained.teacher));
    struct Frozen(usize, usize);
    impl ModuleVisitor<AB> for Frozen {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            if p.val().is_require_grad() { self.0 += 1 } else { self.1 += 1 }
        }
    }
    let mut t = Frozen(0, 0);
    loaded.teacher.visit(&mut t);
    assert_eq!(t.0, 0, "teacher parameters must stay frozen after loading a record");
    let mut e = Frozen(0, 0);
    loaded.encoder.visit(&mut e);
    assert_eq!(e.1, 0, "encoder parameters must stay trainable after loading a record");
}
