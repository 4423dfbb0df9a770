//! The `Batch` handed to the trainer: plain Rust buffers, no burn types.
//!
//! # Contract
//! - `views`: u8, `[B, 3, S, S]` planar RGB (S = 224), the encoder's view before normalisation.
//! - `token_views`: u8, `[B, 3, T, T]` planar RGB (T = 112), the tokenizer's view.
//! - `masked`: u32, `[B, num_masked]` patch indices (raster order, row * grid + col), each row
//!   sorted ascending; `visible`: u32, `[B, num_patches - num_masked]`, sorted. Every row has the
//!   same count (spec §1.1: the generator masks exactly `num_masked`).
//! - `labels`: class index per sample; `keys`: sample keys.
//!
//! Normalisation is a documented step the trainer does on the device (spec §1 step 6):
//! view 1: `(x / 255 - mean) / std` with the ImageNet mean/std ([`IMAGENET_MEAN`],
//! [`IMAGENET_STD`]); view 2: DALL-E `map_pixels`: `0.8 * x / 255 + 0.1`. For CPU training,
//! [`Batch::views_f32`] and [`Batch::token_views_f32`] do the same on the CPU.
//!
//! Image buffers come from a pool and go back to it when the batch is dropped.

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

/// ImageNet mean (RGB, 0..1 scale).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std (RGB, 0..1 scale).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// DALL-E logit-Laplace epsilon: `map_pixels(x) = (1 - 2 eps) x + eps` (spec §1 step 6).
pub const DALLE_EPS: f32 = 0.1;

/// Where the loader is: resumes exactly after the batch it was taken from ([`Batch::resume`];
/// a checkpoint saves it and [`crate::Loader::new`] starts from it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    /// Batches already delivered in `epoch`.
    pub batch: u64,
    /// Shuffle-buffer outputs (samples, good or bad) already consumed in `epoch`.
    pub consumed: u64,
    /// The shuffle buffer's byte cap shaped this epoch's order before this point: the position
    /// cannot be computed from the counts and is replayed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
    /// What the state refers to: [`crate::loader::data_fingerprint`] of the shard list, counts
    /// and data config. `None` in states saved before it existed (accepted with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<u64>,
}

/// A batch of CAE samples (see the module docs for the layout).
#[derive(Debug)]
pub struct Batch {
    pub batch_size: usize,
    pub view_size: usize,
    pub token_size: usize,
    pub grid: usize,
    pub num_masked: usize,
    pub views: Vec<u8>,
    pub token_views: Vec<u8>,
    pub masked: Vec<u32>,
    pub visible: Vec<u32>,
    pub labels: Vec<i64>,
    pub keys: Vec<String>,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Index of this batch within its epoch.
    pub index: u64,
    /// Loader state that resumes right after this batch (save it with a checkpoint).
    pub resume: LoaderState,
    pub(crate) pool: Option<BufferPool>,
}

impl Batch {
    pub fn num_patches(&self) -> usize {
        self.grid * self.grid
    }
    pub fn num_visible(&self) -> usize {
        self.num_patches() - self.num_masked
    }

    /// View 1 as f32 `[B, 3, S, S]`, normalised with the ImageNet mean/std.
    pub fn views_f32(&self) -> Vec<f32> {
        normalize_imagenet(&self.views, self.view_size * self.view_size)
    }

    /// View 2 as f32 `[B, 3, T, T]` through DALL-E's `map_pixels` (range 0.1..0.9).
    pub fn token_views_f32(&self) -> Vec<f32> {
        let lut: [f32; 256] = std::array::from_fn(|v| (1.0 - 2.0 * DALLE_EPS) * (v as f32 / 255.0) + DALLE_EPS);
        self.token_views.iter().map(|&v| lut[v as usize]).collect()
    }

    /// The mask as `[B, num_patches]` booleans (true = masked).
    pub fn mask_bool(&self) -> Vec<bool> {
        let n = self.num_patches();
        let mut m = vec![false; self.batch_size * n];
        for (b, row) in self.masked.chunks_exact(self.num_masked).enumerate() {
            for &i in row {
                m[b * n + i as usize] = true;
            }
        }
        m
    }
}

/// Planar RGB u8 images (`[n, 3, plane]`) as f32 `(x / 255 - mean) / std` per channel, with the
/// ImageNet mean/std.
pub fn normalize_imagenet(planar: &[u8], plane: usize) -> Vec<f32> {
    let luts: Vec<[f32; 256]> =
        (0..3).map(|c| std::array::from_fn(|v| (v as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])).collect();
    let mut out = Vec::with_capacity(planar.len());
    for (i, chunk) in planar.chunks_exact(plane.max(1)).enumerate() {
        let lut = &luts[i % 3];
        out.extend(chunk.iter().map(|&v| lut[v as usize]));
    }
    out
}

impl Clone for Batch {
    /// A copy with buffers of its own (not pooled).
    fn clone(&self) -> Self {
        Self {
            batch_size: self.batch_size,
            view_size: self.view_size,
            token_size: self.token_size,
            grid: self.grid,
            num_masked: self.num_masked,
            views: self.views.clone(),
            token_views: self.token_views.clone(),
            masked: self.masked.clone(),
            visible: self.visible.clone(),
            labels: self.labels.clone(),
            keys: self.keys.clone(),
            epoch: self.epoch,
            index: self.index,
            resume: self.resume,
            pool: None,
        }
    }
}

impl Batch {
    /// A batch of generated pixels (seeded) with a fixed valid mask and no pooled buffers: the
    /// contract above without decoding, for compute-only benchmarks. Row b masks patch i when
    /// `(37·i + 11·b) mod N < num_masked` (exactly `num_masked` per row when gcd(37, N) = 1,
    /// as for every square grid up to 36).
    pub fn synthetic(
        batch_size: usize,
        view_size: usize,
        token_size: usize,
        grid: usize,
        num_masked: usize,
        seed: u64,
    ) -> Self {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 56) as u8
                })
                .collect()
        };
        let views = bytes(batch_size * 3 * view_size * view_size);
        let token_views = bytes(batch_size * 3 * token_size * token_size);
        let n = grid * grid;
        let (mut masked, mut visible) = (Vec::new(), Vec::new());
        for b in 0..batch_size {
            for i in 0..n {
                let list = if (37 * i + 11 * b) % n < num_masked { &mut masked } else { &mut visible };
                list.push(i as u32);
            }
        }
        Self {
            batch_size,
            view_size,
            token_size,
            grid,
            num_masked,
            views,
            token_views,
            masked,
            visible,
            labels: vec![-1; batch_size],
            keys: (0..batch_size).map(|b| format!("synthetic-{b}")).collect(),
            epoch: 0,
            index: 0,
            resume: LoaderState::default(),
            pool: None,
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::take(&mut self.views), std::mem::take(&mut self.token_views));
        }
    }
}

/// Recycles batch image buffers (bounded: at most `capacity` pairs are kept).
#[derive(Debug, Clone)]
pub struct BufferPool {
    tx: Sender<(Vec<u8>, Vec<u8>)>,
    rx: Receiver<(Vec<u8>, Vec<u8>)>,
}

impl BufferPool {
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        Self { tx, rx }
    }
    /// A pair of buffers of the given sizes (reused when one is available).
    pub fn get(&self, views: usize, tokens: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut v, mut t) = self.rx.try_recv().unwrap_or_default();
        v.resize(views, 0);
        t.resize(tokens, 0);
        (v, t)
    }
    fn put(&self, v: Vec<u8>, t: Vec<u8>) {
        let _ = self.tx.try_send((v, t)); // full: let it drop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row masks exactly `num_masked` patches, rows differ, visible + masked cover the
    /// grid once each, and a clone is equal but unpooled.
    #[test]
    fn synthetic_batches_keep_the_contract() {
        for (grid, k) in [(4, 6), (8, 40), (14, 75)] {
            let b = Batch::synthetic(3, 16, 8, grid, k, 5);
            let n = grid * grid;
            assert_eq!((b.masked.len(), b.visible.len()), (3 * k, 3 * (n - k)));
            for row in 0..3 {
                let mut all: Vec<u32> = b.masked[row * k..(row + 1) * k].to_vec();
                all.extend_from_slice(&b.visible[row * (n - k)..(row + 1) * (n - k)]);
                all.sort_unstable();
                assert_eq!(all, (0..n as u32).collect::<Vec<_>>());
            }
            assert_ne!(b.masked[..k], b.masked[k..2 * k]);
            assert_eq!((b.views.len(), b.token_views.len()), (3 * 3 * 16 * 16, 3 * 3 * 8 * 8));
            let c = b.clone();
            assert!(c.pool.is_none() && c.views == b.views && c.masked == b.masked);
        }
    }

    fn tiny_batch() -> Batch {
        Batch {
            batch_size: 1,
            view_size: 1,
            token_size: 1,
            grid: 2,
            num_masked: 1,
            views: vec![0, 128, 255],
            token_views: vec![0, 255, 51],
            masked: vec![2],
            visible: vec![0, 1, 3],
            labels: vec![7],
            keys: vec!["k".into()],
            epoch: 0,
            index: 0,
            resume: LoaderState::default(),
            pool: None,
        }
    }

    #[test]
    fn normalisation_follows_the_spec_formulas() {
        let b = tiny_batch();
        let v = b.views_f32();
        let expect = [(0.0 - 0.485) / 0.229, (128.0 / 255.0 - 0.456) / 0.224, (1.0 - 0.406) / 0.225];
        for (got, want) in v.iter().zip(expect) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        let t = b.token_views_f32();
        assert!((t[0] - 0.1).abs() < 1e-7 && (t[1] - 0.9).abs() < 1e-7 && (t[2] - (0.8 * 0.2 + 0.1)).abs() < 1e-6);
        assert_eq!(b.mask_bool(), vec![false, false, true, false]);
    }

    #[test]
    fn pool_recycles_buffers() {
        let pool = BufferPool::new(2);
        let mut b = tiny_batch();
        let (v, t) = pool.get(3, 3);
        let ptr = v.as_ptr();
        b.views = v;
        b.token_views = t;
        b.pool = Some(pool.clone());
        drop(b);
        let (v2, _) = pool.get(3, 3);
        assert_eq!(v2.as_ptr(), ptr, "the dropped batch's buffer is reused");
    }
}
