//! Model tests on the CPU flex backend (micro / tiny configs, spec §7). Golden values are
//! computed independently (formulas, plain-Rust reference implementations, spec §2.7 figures).

mod dalle;
mod forward;
mod init;
mod params;
pub mod reference;
mod training;
mod units;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};

pub type B = Flex;
pub type AB = Autodiff<Flex>;

pub fn device() -> burn::tensor::Device<B> {
    Default::default()
}

/// Replaces every float parameter by N(0, std²) draws, so tests do not depend on the special
/// structure of the init (zero biases, equal gammas, unit LN weights).
pub fn randomize<Bk: Backend, M: Module<Bk>>(module: M, std: f64) -> M {
    struct R(f64);
    impl<Bk: Backend> ModuleMapper<Bk> for R {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
            let v = param.val();
            let req = v.is_require_grad();
            let t = Tensor::<Bk, D>::random(v.shape(), Distribution::Normal(0.0, self.0), &v.device());
            Param::initialized(param.id, if req { t.require_grad() } else { t })
        }
    }
    module.map(&mut R(std))
}

pub fn to_vec<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

pub fn to_vec_i64<Bk: Backend, const D: usize>(t: Tensor<Bk, D, burn::tensor::Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

/// Images `[b, 3, s, s]` with a fixed seed.
pub fn images<Bk: Backend>(b: usize, s: usize, seed: u64, device: &Bk::Device) -> Tensor<Bk, 4> {
    Bk::seed(device, seed);
    Tensor::random([b, 3, s, s], Distribution::Normal(0.0, 1.0), device)
}
