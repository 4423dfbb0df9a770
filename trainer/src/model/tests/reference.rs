//! A plain-Rust, f64, loop-based reference of the spec's formulas (§2.1, §2.3, §2.4), written
//! independently of the burn code: no tensors, explicit per-head loops, GELU through its own erf.
//! It reads weights from the burn modules (burn's `Linear` stores `[d_in, d_out]`).

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::Tensor;

use super::{B, to_vec};
use crate::model::block::Block;
use crate::model::encoder::Encoder;
use crate::model::regressor::Regressor;

pub fn p1(p: &Param<Tensor<B, 1>>) -> Vec<f64> {
    to_vec(p.val()).into_iter().map(f64::from).collect()
}

pub struct Lin {
    w: Vec<f64>,
    b: Option<Vec<f64>>,
    din: usize,
    dout: usize,
}

impl Lin {
    pub fn from(l: &Linear<B>) -> Self {
        let [din, dout] = l.weight.val().dims();
        Self { w: to_vec(l.weight.val()).into_iter().map(f64::from).collect(), b: l.bias.as_ref().map(p1), din, dout }
    }
    /// x: n × din -> n × dout
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        let n = x.len() / self.din;
        let mut y = vec![0.0; n * self.dout];
        for i in 0..n {
            for o in 0..self.dout {
                let mut s = self.b.as_ref().map_or(0.0, |b| b[o]);
                for k in 0..self.din {
                    s += x[i * self.din + k] * self.w[k * self.dout + o];
                }
                y[i * self.dout + o] = s;
            }
        }
        y
    }
}

pub struct Ln {
    g: Vec<f64>,
    b: Vec<f64>,
    eps: f64,
}

impl Ln {
    pub fn from(l: &LayerNorm<B>, eps: f64) -> Self {
        Self { g: p1(&l.gamma), b: l.beta.as_ref().map(p1).unwrap(), eps }
    }
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        let d = self.g.len();
        let mut y = vec![0.0; x.len()];
        for (row, out) in x.chunks(d).zip(y.chunks_mut(d)) {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            for j in 0..d {
                out[j] = (row[j] - mean) / (var + self.eps).sqrt() * self.g[j] + self.b[j];
            }
        }
        y
    }
}

/// erf via Numerical Recipes' erfc Chebyshev fit (fractional error < 1.2e-7).
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

pub fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Row-wise multiply by a D-vector.
pub fn scale(a: &[f64], g: &[f64]) -> Vec<f64> {
    let d = g.len();
    a.iter().enumerate().map(|(i, x)| x * g[i % d]).collect()
}

/// softmax(q kᵀ / √hd) v, per head, q: nq×d, k, v: nk×d.
pub fn attention(q: &[f64], k: &[f64], v: &[f64], d: usize, heads: usize) -> Vec<f64> {
    let (nq, nk, hd) = (q.len() / d, k.len() / d, d / heads);
    let mut out = vec![0.0; nq * d];
    for h in 0..heads {
        for i in 0..nq {
            let logits: Vec<f64> = (0..nk)
                .map(|j| {
                    (0..hd).map(|c| q[i * d + h * hd + c] * k[j * d + h * hd + c]).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for c in 0..hd {
                out[i * d + h * hd + c] = (0..nk).map(|j| e[j] / s * v[j * d + h * hd + c]).sum();
            }
        }
    }
    out
}

pub fn ffn(x: &[f64], fc1: &Linear<B>, fc2: &Linear<B>) -> Vec<f64> {
    let h: Vec<f64> = Lin::from(fc1).apply(x).into_iter().map(gelu).collect();
    Lin::from(fc2).apply(&h)
}

/// Pre-norm block with fused qkv and bias [q_bias, 0, v_bias] (spec §2.1).
pub fn block(x: &[f64], blk: &Block<B>, eps: f64) -> Vec<f64> {
    let d = blk.gamma_1.val().dims()[0];
    let n = x.len() / d;
    let h = Ln::from(&blk.ln1, eps).apply(x);
    let qkv = Lin::from(&blk.attn.qkv).apply(&h); // n × 3d
    let (qb, vb) = (p1(&blk.attn.q_bias), p1(&blk.attn.v_bias));
    let mut q = vec![0.0; n * d];
    let mut k = vec![0.0; n * d];
    let mut v = vec![0.0; n * d];
    for i in 0..n {
        for c in 0..d {
            q[i * d + c] = qkv[i * 3 * d + c] + qb[c];
            k[i * d + c] = qkv[i * 3 * d + d + c];
            v[i * d + c] = qkv[i * 3 * d + 2 * d + c] + vb[c];
        }
    }
    let a = Lin::from(&blk.attn.proj).apply(&attention(&q, &k, &v, d, blk.attn.num_heads));
    let x = add(x, &scale(&a, &p1(&blk.gamma_1)));
    let f = ffn(&Ln::from(&blk.ln2, eps).apply(&x), &blk.ffn.fc1, &blk.ffn.fc2);
    add(&x, &scale(&f, &p1(&blk.gamma_2)))
}

/// Sin-cos position embedding of patch t, computed from the spec formula in f64.
pub fn pos(t: usize, grid: usize, d: usize) -> Vec<f64> {
    let p = d / 4;
    let (row, col) = ((t / grid) as f64, (t % grid) as f64);
    let mut out = vec![0.0; d];
    for i in 0..p {
        let w = 1.0 / 10000f64.powf(i as f64 / p as f64);
        out[i] = (row * w).sin();
        out[p + i] = (row * w).cos();
        out[2 * p + i] = (col * w).sin();
        out[3 * p + i] = (col * w).cos();
    }
    out
}

/// Encoder on one image (3×s×s, CHW) restricted to `visible` patches: (1 + n_vis) × d.
pub fn encoder(enc: &Encoder<B>, image: &[f64], s: usize, patch: usize, visible: &[usize], eps: f64) -> Vec<f64> {
    let w = to_vec(enc.patch_embed.projection.weight.val()); // [d, 3, p, p]
    let bias = p1(enc.patch_embed.projection.bias.as_ref().unwrap());
    let d = bias.len();
    let grid = s / patch;
    let mut x = to_vec(enc.cls_token.val()).into_iter().map(f64::from).collect::<Vec<_>>();
    for &t in visible {
        let (r0, c0) = ((t / grid) * patch, (t % grid) * patch);
        let pe = pos(t, grid, d);
        for o in 0..d {
            let mut acc = bias[o];
            for ch in 0..3 {
                for i in 0..patch {
                    for j in 0..patch {
                        acc += w[((o * 3 + ch) * patch + i) * patch + j] as f64 * image[(ch * s + r0 + i) * s + c0 + j];
                    }
                }
            }
            x.push(acc + pe[o]);
        }
    }
    for blk in &enc.layers {
        x = block(&x, blk, eps);
    }
    Ln::from(&enc.ln1, eps).apply(&x)
}

/// Regressor on one sample (spec §2.3): x_vis n_vis×d, positions given as patch indices.
pub fn regressor(
    reg: &Regressor<B>,
    x_vis: &[f64],
    vis: &[usize],
    masked: &[usize],
    grid: usize,
    eps: f64,
) -> Vec<f64> {
    let mt = to_vec(reg.mask_token.val());
    let d = mt.len();
    let p_v: Vec<f64> = vis.iter().flat_map(|&t| pos(t, grid, d)).collect();
    let p_m: Vec<f64> = masked.iter().flat_map(|&t| pos(t, grid, d)).collect();
    let mut q: Vec<f64> = masked.iter().flat_map(|_| mt.iter().map(|&v| v as f64)).collect();
    for l in &reg.layers {
        let kv: Vec<f64> = x_vis.iter().chain(q.iter()).cloned().collect();
        let p_kv: Vec<f64> = p_v.iter().chain(p_m.iter()).cloned().collect();
        let qq = add(&Lin::from(&l.cross_attn.q).apply(&Ln::from(&l.norm1_q, eps).apply(&add(&q, &p_m))), &{
            let b = p1(&l.cross_attn.q_bias);
            (0..q.len()).map(|i| b[i % d]).collect::<Vec<_>>()
        });
        let kk = Lin::from(&l.cross_attn.k).apply(&Ln::from(&l.norm1_k, eps).apply(&add(&kv, &p_kv)));
        let vv = add(&Lin::from(&l.cross_attn.v).apply(&Ln::from(&l.norm1_v, eps).apply(&kv)), &{
            let b = p1(&l.cross_attn.v_bias);
            (0..kv.len()).map(|i| b[i % d]).collect::<Vec<_>>()
        });
        let a = Lin::from(&l.cross_attn.proj).apply(&attention(&qq, &kk, &vv, d, l.cross_attn.num_heads));
        let x = add(&q, &scale(&a, &p1(&l.gamma_1)));
        let x = Ln::from(&l.norm2, eps).apply(&x);
        let f = ffn(&x, &l.ffn.fc1, &l.ffn.fc2);
        q = add(&x, &scale(&f, &p1(&l.gamma_2)));
    }
    Ln::from(&reg.norm_regressor, eps).apply(&q)
}

/// Decoder + head on one sample (spec §2.4): latent_pred n_mask×d -> n_mask×out.
pub fn decoder(
    dec: &crate::model::Decoder<B>,
    latent_pred: &[f64],
    masked: &[usize],
    grid: usize,
    eps: f64,
) -> Vec<f64> {
    let d = dec.norm_decoder.gamma.val().dims()[0];
    let p_m: Vec<f64> = masked.iter().flat_map(|&t| pos(t, grid, d)).collect();
    let mut y = add(latent_pred, &p_m);
    for blk in &dec.layers {
        y = block(&y, blk, eps);
    }
    Lin::from(&dec.head).apply(&Ln::from(&dec.norm_decoder, eps).apply(&y))
}
