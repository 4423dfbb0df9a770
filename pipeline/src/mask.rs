//! Block-wise mask generator, exactly spec §1.1 (BEiT's generator with MS0's `!=` loop, which
//! always masks exactly `num_masked` patches).

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

/// Mask parameters (spec §1.1; defaults are MS0's: 75 of 14x14, blocks of at least 16, aspect
/// 0.3..1/0.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskConfig {
    /// Patches per side (224 / 16 = 14).
    pub grid: usize,
    /// Exactly this many patches are masked per sample.
    pub num_masked: usize,
    /// Smallest block area drawn (the last block may be smaller to fill the remainder).
    pub min_num_patches: usize,
    /// Largest block area; `None` means `num_masked`.
    pub max_num_patches: Option<usize>,
    /// Smallest block aspect (rows/cols); the largest is `max_aspect` or `1/min_aspect`.
    pub min_aspect: f64,
    pub max_aspect: Option<f64>,
}

impl Default for MaskConfig {
    fn default() -> Self {
        Self { grid: 14, num_masked: 75, min_num_patches: 16, max_num_patches: None, min_aspect: 0.3, max_aspect: None }
    }
}

/// Why a mask configuration cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mask config: {0}")]
pub struct MaskConfigError(pub String);

impl MaskConfig {
    /// Patches in the grid.
    pub fn num_patches(&self) -> usize {
        self.grid * self.grid
    }

    /// Rejects configurations whose loop could never finish (spec §7 B: with a 4x4 grid a minimum
    /// block of 16 never fits, so the loop would spin forever).
    pub fn validate(&self) -> Result<(), MaskConfigError> {
        if self.grid < 2 {
            return Err(MaskConfigError(format!("grid {} is too small", self.grid)));
        }
        if self.num_masked == 0 || self.num_masked >= self.num_patches() {
            return Err(MaskConfigError(format!(
                "num_masked {} must be in 1..{} (some patches must stay visible)",
                self.num_masked,
                self.num_patches()
            )));
        }
        if self.max_num_patches == Some(0) {
            return Err(MaskConfigError("mask.max_num_patches must be at least 1 (0 can never mask a patch)".into()));
        }
        // `!(x > 0)` also catches NaN, which compares false with everything.
        if !(self.min_aspect.is_finite() && self.min_aspect > 0.0) {
            return Err(MaskConfigError(format!(
                "mask.min_aspect {} must be a finite number above 0",
                self.min_aspect
            )));
        }
        if let Some(a) = self.max_aspect
            && !(a.is_finite() && a >= self.min_aspect)
        {
            return Err(MaskConfigError(format!(
                "mask.max_aspect {a} must be a finite number at least mask.min_aspect {}",
                self.min_aspect
            )));
        }
        // A square block of the minimum area must fit strictly inside the grid, or nearly every
        // draw fails and the loop crawls (spec §7 B).
        let side = (self.min_num_patches as f64).sqrt();
        if side.round() as usize >= self.grid {
            return Err(MaskConfigError(format!(
                "min_num_patches {} cannot fit as a block smaller than the {}x{} grid",
                self.min_num_patches, self.grid, self.grid
            )));
        }
        Ok(())
    }
}

/// A drawn mask: `masked` and `visible` patch indices, each sorted ascending (raster order,
/// index = row * grid + col). `masked.len()` is always `num_masked`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchMask {
    pub masked: Vec<u32>,
    pub visible: Vec<u32>,
}

/// Python's `round` (half to even) followed by `int`.
pub(crate) fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// Python's `random.uniform(a, b)` = a + (b - a) * random(), valid for b < a too.
pub(crate) fn uniform(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// Rounds of 10 block draws in a row that may add no patch before [`generate`] gives up. A
/// valid configuration needs a handful at most (the default config's worst case over 10^5 masks
/// is far below this); an unworkable one would otherwise loop for ever.
pub const MAX_FRUITLESS_ROUNDS: usize = 10_000;

/// The mask generator could not place the patches it must (a configuration that validation let
/// through but no draw can satisfy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mask generator gave up: {placed} of {wanted} patches placed after {rounds} rounds without progress")]
pub struct MaskGenError {
    pub placed: usize,
    pub wanted: usize,
    pub rounds: usize,
}

/// Draws a mask (spec §1.1). `cfg` should have passed [`MaskConfig::validate`]; if no block can
/// be placed for [`MAX_FRUITLESS_ROUNDS`] rounds in a row, gives up with an error instead of
/// looping for ever. The random stream is the reference's, so successful draws are unchanged.
pub fn generate(cfg: &MaskConfig, rng: &mut impl Rng) -> Result<PatchMask, MaskGenError> {
    let g = cfg.grid;
    let n = cfg.num_masked;
    let max_patches = cfg.max_num_patches.unwrap_or(n);
    let lo = cfg.min_aspect.ln();
    let hi = cfg.max_aspect.unwrap_or(1.0 / cfg.min_aspect).ln();
    let mut mask = vec![false; g * g];
    let mut count = 0usize;
    let mut fruitless = 0usize;
    while count != n {
        if fruitless >= MAX_FRUITLESS_ROUNDS {
            return Err(MaskGenError { placed: count, wanted: n, rounds: fruitless });
        }
        let cap = (n - count).min(max_patches);
        let mut delta = 0usize;
        for _attempt in 0..10 {
            let area = uniform(rng, cfg.min_num_patches as f64, cap as f64);
            let ar = uniform(rng, lo, hi).exp();
            let h = py_round((area * ar).sqrt()).max(0) as usize; // rows
            let w = py_round((area / ar).sqrt()).max(0) as usize; // cols
            if w < g && h < g {
                let top = rng.random_range(0..=g - h);
                let left = rng.random_range(0..=g - w);
                let mut already = 0;
                for r in top..top + h {
                    for c in left..left + w {
                        already += mask[r * g + c] as usize;
                    }
                }
                let new = h * w - already;
                if 0 < new && new <= cap {
                    for r in top..top + h {
                        for c in left..left + w {
                            if !mask[r * g + c] {
                                mask[r * g + c] = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        count += delta;
        fruitless = if delta == 0 { fruitless + 1 } else { 0 };
    }
    let mut masked = Vec::with_capacity(n);
    let mut visible = Vec::with_capacity(g * g - n);
    for (i, &m) in mask.iter().enumerate() {
        if m { masked.push(i as u32) } else { visible.push(i as u32) }
    }
    Ok(PatchMask { masked, visible })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Connected components (4-neighbourhood) of a mask, as bounding boxes.
    fn grid_of(m: &PatchMask, g: usize) -> Vec<bool> {
        let mut v = vec![false; g * g];
        for &i in &m.masked {
            v[i as usize] = true;
        }
        v
    }

    #[test]
    fn exact_count_sorted_and_disjoint_over_many_draws() {
        let cfg = MaskConfig::default();
        cfg.validate().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut freq = vec![0u32; 196];
        let draws = 2000;
        for _ in 0..draws {
            let m = generate(&cfg, &mut rng).unwrap();
            assert_eq!(m.masked.len(), 75);
            assert_eq!(m.visible.len(), 121);
            assert!(m.masked.windows(2).all(|w| w[0] < w[1]));
            assert!(m.visible.windows(2).all(|w| w[0] < w[1]));
            let mut all: Vec<u32> = m.masked.iter().chain(&m.visible).copied().collect();
            all.sort();
            assert_eq!(all, (0..196).collect::<Vec<u32>>());
            for &i in &m.masked {
                freq[i as usize] += 1;
            }
        }
        // Statistics: every patch is masked sometimes; the mean rate is 75/196; blocks favour
        // the centre over the corners (a block covering a corner must start there).
        let rate = |i: usize| freq[i] as f64 / draws as f64;
        assert!((0..196).all(|i| freq[i] > 0));
        let centre = (rate(6 * 14 + 6) + rate(6 * 14 + 7) + rate(7 * 14 + 6) + rate(7 * 14 + 7)) / 4.0;
        let corners = (rate(0) + rate(13) + rate(182) + rate(195)) / 4.0;
        assert!(centre > corners, "centre {centre} corners {corners}");
        let mean: f64 = (0..196).map(rate).sum::<f64>() / 196.0;
        assert!((mean - 75.0 / 196.0).abs() < 1e-9);
    }

    #[test]
    fn masks_are_blocks_not_scattered_patches() {
        // The first block has area >= 16 and both sides < 14: so a mask always contains at least
        // one fully masked rectangle with rows, cols < 14 and area >= 16 - e.g. a 4x4 box or a
        // 2x8 strip. Check that every mask has a masked rectangle of area >= 12 (aspect-limited
        // rounding can give 3x4).
        let cfg = MaskConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..200 {
            let m = generate(&cfg, &mut rng).unwrap();
            let g = grid_of(&m, 14);
            let mut best = 0;
            for t in 0..14 {
                for l in 0..14 {
                    for h in 1..14 - t + 1 {
                        for w in 1..14 - l + 1 {
                            if h * w <= best {
                                continue;
                            }
                            if (t..t + h).all(|r| (l..l + w).all(|c| g[r * 14 + c])) {
                                best = h * w;
                            }
                        }
                    }
                }
            }
            assert!(best >= 12, "largest masked rectangle {best}");
        }
    }

    #[test]
    fn micro_and_authors_variants() {
        let micro = MaskConfig { grid: 4, num_masked: 6, min_num_patches: 2, ..Default::default() };
        micro.validate().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..500 {
            assert_eq!(generate(&micro, &mut rng).unwrap().masked.len(), 6);
        }
        let authors = MaskConfig { num_masked: 98, ..Default::default() };
        for _ in 0..200 {
            assert_eq!(generate(&authors, &mut rng).unwrap().masked.len(), 98);
        }
    }

    #[test]
    fn impossible_configs_are_rejected() {
        let spin = MaskConfig { grid: 4, num_masked: 6, min_num_patches: 16, ..Default::default() };
        assert!(spin.validate().is_err(), "spec §7 B: min 16 never fits a 4x4 grid");
        assert!(MaskConfig { num_masked: 196, ..Default::default() }.validate().is_err());
        assert!(MaskConfig { num_masked: 0, ..Default::default() }.validate().is_err());
    }

    /// Regression: these values passed validation (or skipped it) and made `generate` spin for
    /// ever. Each is now a config error naming its key, and the generator itself gives up.
    #[test]
    fn values_that_looped_for_ever_are_config_errors_and_the_generator_gives_up() {
        let cases: [(MaskConfig, &str); 6] = [
            (MaskConfig { max_num_patches: Some(0), ..Default::default() }, "mask.max_num_patches"),
            (MaskConfig { min_aspect: f64::NAN, ..Default::default() }, "mask.min_aspect"),
            (MaskConfig { min_aspect: f64::INFINITY, ..Default::default() }, "mask.min_aspect"),
            (MaskConfig { min_aspect: -0.3, ..Default::default() }, "mask.min_aspect"),
            (MaskConfig { max_aspect: Some(f64::NAN), ..Default::default() }, "mask.max_aspect"),
            (MaskConfig { max_aspect: Some(0.1), ..Default::default() }, "mask.max_aspect"),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (cfg, key) in cases {
            let e = cfg.validate().expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
        }
        // Unvalidated, the two that spun before: an error after bounded work, not a hang.
        for cfg in [
            MaskConfig { max_num_patches: Some(0), ..Default::default() },
            MaskConfig { min_aspect: f64::NAN, ..Default::default() },
        ] {
            let e = generate(&cfg, &mut rng).expect_err("must give up");
            assert_eq!((e.placed, e.wanted, e.rounds), (0, 75, MAX_FRUITLESS_ROUNDS));
        }
    }

    #[test]
    fn python_rounding_is_half_to_even() {
        assert_eq!(py_round(0.5), 0);
        assert_eq!(py_round(1.5), 2);
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(2.5000001), 3);
        // uniform(a, b) with b < a stays in [b, a] like Python's
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..100 {
            let u = uniform(&mut rng, 16.0, 3.0);
            assert!((3.0..=16.0).contains(&u), "{u}");
        }
    }
}
