//! The one all-reduce of a data-parallel optimizer step (docs/scaling-out.md).
//!
//! After the (accumulated) backward, every gradient of a parameter that trains is copied, in the
//! module's parameter order ([`crate::optim::param_names`]' order), into one reused host f32
//! buffer (one device -> host read), followed by
//!
//! - one presence flag per parameter (1 where this rank has its gradient; an unused parameter
//!   gets no gradient on any rank, exactly as in a single-process run), and
//! - the control values: the step's three mean losses, its images, whether this rank was asked
//!   to stop (and by which signal), whether its data ended or failed, whether it had no batch.
//!
//! The buffer is summed over the ranks with one `all_reduce`, the gradients are scaled by
//! `1/world` and uploaded back (one upload, then views). Every rank then holds the same mean
//! gradients, so the clip norm, the f16 overflow skip and the update are identical everywhere,
//! and the same control sums: every rank stops after the same step. No other collective runs
//! in a normal step; a data-parallel step has one host sync (the gradient read).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use crate::CaeError;
use crate::dist::Dist;

/// What this rank tells the group with its gradients.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalControl {
    pub images: usize,
    /// A signal asked this rank to stop (its number).
    pub stop_signal: Option<i32>,
    /// This rank's data ended during the step.
    pub data_ended: bool,
    /// This rank's data failed (a fatal data error).
    pub failed: bool,
    /// This rank had no batch at all this step.
    pub no_batch: bool,
}

/// The control values summed over the group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupControl {
    /// The mean over the ranks of `[loss, loss_main, loss_align]`.
    pub losses: [f64; 3],
    pub images: usize,
    /// The signal that stopped a rank (when several did, the mean of their numbers, which is
    /// the number when they were the same signal).
    pub stop_signal: Option<i32>,
    pub ended_ranks: usize,
    pub failed_ranks: usize,
    pub ranks_without_batch: usize,
}

/// Slots after the presence flags.
const CONTROL: usize = 9;

/// The step's reused host buffer.
#[derive(Default)]
pub struct GradReducer {
    buf: Vec<f32>,
}

/// A trainable parameter's place in the buffer.
struct Slot {
    id: ParamId,
    numel: usize,
}

/// The trainable parameters of `module`, in visit order.
fn slots<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<Slot> {
    struct V(Vec<Slot>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let v = param.val();
            if v.is_require_grad() {
                self.0.push(Slot { id: param.id, numel: v.shape().num_elements() });
            }
        }
    }
    let mut v = V(Vec::new());
    module.visit(&mut v);
    v.0
}

impl GradReducer {
    /// Sums this rank's gradients (`None`: it had no batch) and losses `[3]` with every other
    /// rank's; returns the mean gradients, the group's control values and the seconds spent in
    /// the all-reduce.
    pub fn reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        dist: &Dist,
        module: &M,
        grads: Option<GradientsParams>,
        losses: Option<Tensor<B::InnerBackend, 1>>,
        local: LocalControl,
        device: &B::Device,
    ) -> Result<(GradientsParams, GroupControl, f64), CaeError> {
        let slots = slots::<B, M>(module);
        let n: usize = slots.iter().map(|s| s.numel).sum();
        let inner_device = device.clone(); // the inner backend's device type is the same
        let (flat, present) = flatten::<B, M>(module, grads, &slots, &inner_device);
        let mut parts = vec![flat];
        parts.push(losses.unwrap_or_else(|| Tensor::zeros([3], &inner_device)));
        self.buf.clear();
        crate::readback::read_f32s_into(Tensor::cat(parts, 0), &mut self.buf)?;
        let losses: Vec<f64> = self.buf.drain(n..).map(f64::from).collect();
        self.buf.extend(present.iter().map(|&p| if p { 1.0 } else { 0.0 }));
        self.buf.extend(control_values(&losses, local));
        let seconds = dist.sum_f32(&mut self.buf);
        let inv = 1.0 / dist.world as f32;
        self.buf[..n].iter_mut().for_each(|g| *g *= inv);
        let present: Vec<bool> = self.buf[n..n + slots.len()].iter().map(|&p| p > 0.0).collect();
        let group = group_control(&self.buf[n + slots.len()..], dist.world);
        let uploaded =
            Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(self.buf[..n].to_vec(), [n]), &inner_device);
        let grads = unflatten::<B, M>(module, uploaded, &slots, &present);
        Ok((grads, group, seconds))
    }
}

/// Every trainable gradient, flattened and concatenated `[n]` (zeros where this rank has none),
/// and which ones it has.
fn flatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: Option<GradientsParams>,
    slots: &[Slot],
    device: &B::Device,
) -> (Tensor<B::InnerBackend, 1>, Vec<bool>) {
    struct V<I: Backend> {
        grads: GradientsParams,
        parts: Vec<Tensor<I, 1>>,
        present: Vec<bool>,
        wanted: std::collections::HashSet<ParamId>,
        device: I::Device,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !self.wanted.contains(&param.id) {
                return;
            }
            let numel = param.val().shape().num_elements();
            match self.grads.remove::<B::InnerBackend, D>(param.id) {
                Some(g) => {
                    self.parts.push(g.reshape([numel]));
                    self.present.push(true);
                }
                None => {
                    self.parts.push(Tensor::zeros([numel], &self.device));
                    self.present.push(false);
                }
            }
        }
    }
    let wanted = slots.iter().map(|s| s.id).collect();
    let mut v = V::<B::InnerBackend> {
        grads: grads.unwrap_or_default(),
        parts: Vec::new(),
        present: Vec::new(),
        wanted,
        device: device.clone(),
    };
    module.visit(&mut v);
    (Tensor::cat(v.parts, 0), v.present)
}

/// The mean gradients back as [`GradientsParams`]: views of one uploaded buffer, registered for
/// the parameters some rank had a gradient for.
fn unflatten<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    flat: Tensor<B::InnerBackend, 1>,
    slots: &[Slot],
    present: &[bool],
) -> GradientsParams {
    struct V<'a, I: Backend> {
        flat: Tensor<I, 1>,
        slots: &'a [Slot],
        present: &'a [bool],
        index: usize,
        offset: usize,
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let Some(slot) = self.slots.get(self.index).filter(|s| s.id == param.id) else { return };
            if self.present[self.index] {
                let g = self.flat.clone().narrow(0, self.offset, slot.numel).reshape(param.val().dims());
                self.out.register::<B::InnerBackend, D>(param.id, g);
            }
            self.offset += slot.numel;
            self.index += 1;
        }
    }
    let mut v = V::<B::InnerBackend> { flat, slots, present, index: 0, offset: 0, out: GradientsParams::new() };
    module.visit(&mut v);
    v.out
}

/// This rank's control slots.
fn control_values(losses: &[f64], c: LocalControl) -> [f32; CONTROL] {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    [
        losses[0] as f32,
        losses[1] as f32,
        losses[2] as f32,
        c.images as f32,
        flag(c.stop_signal.is_some()),
        c.stop_signal.unwrap_or(0) as f32,
        flag(c.data_ended),
        flag(c.failed),
        flag(c.no_batch),
    ]
}

/// The group's decision from the summed control slots.
fn group_control(v: &[f32], world: usize) -> GroupControl {
    let count = |x: f32| x.round().max(0.0) as usize;
    let stopped = count(v[4]);
    let with_batch = world.saturating_sub(count(v[8])).max(1) as f64;
    GroupControl {
        losses: [f64::from(v[0]) / with_batch, f64::from(v[1]) / with_batch, f64::from(v[2]) / with_batch],
        images: count(v[3]),
        stop_signal: (stopped > 0).then(|| (f64::from(v[5]) / stopped as f64).round() as i32),
        ended_ranks: count(v[6]),
        failed_ranks: count(v[7]),
        ranks_without_batch: count(v[8]),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};

    use super::*;

    type AB = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        a: Linear<B>,
        b: Linear<B>,
    }

    #[test]
    fn one_process_gets_its_own_gradients_back_and_its_control_values() {
        let dev = Default::default();
        let m = Two::<AB> { a: LinearConfig::new(3, 2).init(&dev), b: LinearConfig::new(2, 1).init(&dev) };
        // Only `a` is used: `b` gets no gradient, and must get none back.
        let x = Tensor::<AB, 2>::from_floats([[1.0, -2.0, 0.5]], &dev);
        let loss = m.a.forward(x).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let want = grads.get::<Flex, 2>(m.a.weight.id).unwrap().into_data();
        let local = LocalControl { images: 4, stop_signal: Some(15), ..LocalControl::default() };
        let losses = Tensor::<Flex, 1>::from_floats([1.5, 1.0, 0.5], &dev);
        let (back, group, _) = GradReducer::default()
            .reduce::<AB, _>(&Dist::single(), &m, Some(grads), Some(losses), local, &dev)
            .unwrap();
        assert_eq!(back.get::<Flex, 2>(m.a.weight.id).unwrap().into_data(), want);
        assert!(back.get::<Flex, 1>(m.a.bias.as_ref().unwrap().id).is_some());
        assert!(back.get::<Flex, 2>(m.b.weight.id).is_none(), "an unused parameter gets no gradient");
        assert_eq!(group.losses, [1.5, 1.0, 0.5]);
        assert_eq!((group.images, group.stop_signal, group.failed_ranks), (4, Some(15), 0));
    }

    #[test]
    fn group_control_averages_losses_over_ranks_with_a_batch() {
        // Two ranks: one stopped by SIGTERM, one without a batch.
        let v = [3.0, 2.0, 1.0, 8.0, 1.0, 15.0, 1.0, 0.0, 1.0];
        let g = group_control(&v, 2);
        assert_eq!(g.losses, [3.0, 2.0, 1.0]);
        assert_eq!((g.images, g.stop_signal, g.ended_ranks, g.ranks_without_batch), (8, Some(15), 1, 1));
        assert_eq!(group_control(&[0.0; CONTROL], 4).stop_signal, None);
    }
}
