//! Fixed 2-D sin-cos position embedding (spec §2.1, MS0 `utils/position_embedding.py`).

use burn::tensor::{Tensor, TensorData, backend::Backend};

/// The (1 + N) x D table as a row-major host vector: row 0 is the cls slot (all zeros), row 1 + t
/// is patch t in raster order (t = row·grid + col).
///
/// With P = D/4 and ω_d = 1/10000^(d/P), d = 0..P-1, computed in f32 like the reference:
/// `pe[t] = [sin(row·ω), cos(row·ω), sin(col·ω), cos(col·ω)]` — the first half encodes the
/// **row** (the reference's `grid_w`, which meshgrid 'ij' makes the row index). spec §2.1
pub fn sincos_table(grid_size: usize, embed_dim: usize) -> Vec<f32> {
    let p = embed_dim / 4;
    let omega: Vec<f32> = (0..p).map(|d| 1.0f32 / 10000f32.powf(d as f32 / p as f32)).collect();
    let n = grid_size * grid_size;
    let mut table = vec![0.0f32; (1 + n) * embed_dim];
    for t in 0..n {
        let (row, col) = ((t / grid_size) as f32, (t % grid_size) as f32);
        let out = &mut table[(1 + t) * embed_dim..(2 + t) * embed_dim];
        for (d, &w) in omega.iter().enumerate() {
            out[d] = (row * w).sin();
            out[p + d] = (row * w).cos();
            out[2 * p + d] = (col * w).sin();
            out[3 * p + d] = (col * w).cos();
        }
    }
    table
}

/// The table as a constant tensor `[1 + N, D]`. It is not a parameter: it is never visited by
/// optimizers or records and never requires grad.
pub fn sincos_pos_embed<B: Backend>(grid_size: usize, embed_dim: usize, device: &B::Device) -> Tensor<B, 2> {
    let n = grid_size * grid_size;
    Tensor::from_data(TensorData::new(sincos_table(grid_size, embed_dim), [1 + n, embed_dim]), device)
}
