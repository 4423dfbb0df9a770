//! Model FLOPs per training image, from a preset's shapes (for `trainer bench`'s model FLOP
//! utilisation, MFU = FLOPs per image × images/s ÷ peak).
//!
//! Counted as in the MFU literature: multiply-adds of the matmuls and convolutions (2 FLOPs
//! each); element-wise work, softmax and norms are left out. Trained parts (encoder, regressor,
//! decoder) cost forward + backward = 3x forward; the teacher (a forward on the masked patches,
//! spec §2.2) and the frozen DALL-E tokenizer (spec §3) cost their forward only.

use crate::model::{CaeConfig, DalleConfig, TargetKind};

/// Multiply-adds of one pre-norm ViT block's forward on `n` tokens of width `d` (qkv, proj, MLP
/// with hidden `mlp`, and the two attention products over `n` keys).
fn block_macs(n: f64, d: f64, mlp: f64) -> f64 {
    n * (4.0 * d * d + 2.0 * d * mlp) + 2.0 * n * n * d
}

/// Multiply-adds of the encoder forward on `n` tokens (cls included): patch embedding of the
/// whole image (every patch is embedded, then the kept ones gathered) and `depth` blocks.
pub fn encoder_macs(c: &CaeConfig, n: usize) -> f64 {
    let (d, p, np) = (c.embed_dim as f64, c.patch_size as f64, c.num_patches() as f64);
    np * 3.0 * p * p * d + c.depth as f64 * block_macs(n as f64, d, c.mlp_dim as f64)
}

/// Multiply-adds of the DALL-E encoder forward on one `s`×`s` view.
pub fn dalle_macs(t: &DalleConfig, s: usize) -> f64 {
    let conv = |n_in: usize, n_out: usize, k: usize, side: usize| (n_in * n_out * k * k * side * side) as f64;
    let h = t.n_hid;
    let widths = [h, h, 2 * h, 4 * h, 8 * h];
    let mut macs = conv(t.input_channels, h, 7, s);
    let mut side = s;
    for g in 0..t.group_count {
        for k in 0..t.n_blk_per_group {
            let (n_in, n_out) = (if k == 0 { widths[g] } else { widths[g + 1] }, widths[g + 1]);
            let hid = n_out / 4;
            if n_in != n_out {
                macs += conv(n_in, n_out, 1, side);
            }
            macs += conv(n_in, hid, 3, side) + 2.0 * conv(hid, hid, 3, side) + conv(hid, n_out, 1, side);
        }
        if g + 1 < t.group_count {
            side /= 2;
        }
    }
    macs + conv(widths[t.group_count], t.vocab_size, 1, side)
}

/// Model FLOPs of one training image: forward + backward of the trained parts, the teacher's
/// forward, and (dalle target) the tokenizer's forward on the `img_size / 2` view.
pub fn train_flops_per_image(c: &CaeConfig) -> f64 {
    let (d, mlp) = (c.embed_dim as f64, c.mlp_dim as f64);
    let (n_mask, n_all) = (c.num_mask as f64, c.num_patches() as f64);
    let encoder = encoder_macs(c, 1 + c.num_visible());
    // Regressor layer: queries n_mask, keys/values all N (visible latents + queries), spec §2.3.
    let regressor_layer =
        n_mask * d * d * 2.0 + 2.0 * n_all * d * d + n_mask * 2.0 * d * mlp + 2.0 * n_mask * n_all * d;
    let out = match c.target {
        TargetKind::Dalle => c.vocab_size as f64,
        TargetKind::Pixels => (3 * c.patch_size * c.patch_size) as f64,
    };
    let decoder = c.decoder_depth as f64 * block_macs(n_mask, d, mlp) + n_mask * d * out;
    let trained = encoder + c.regressor_depth as f64 * regressor_layer + decoder;
    let teacher = encoder_macs(c, 1 + c.num_mask);
    let tokenizer = match c.target {
        TargetKind::Dalle => dalle_macs(&c.tokenizer, c.img_size / 2),
        TargetKind::Pixels => 0.0,
    };
    2.0 * (3.0 * trained + teacher + tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ViT-B/16 on all 197 tokens is the published 17.6 GFLOPs (fvcore counts multiply-adds:
    /// timm's `vit_base_patch16_224` model card, DeiT table 1): our count within 1 %.
    #[test]
    fn vit_b_forward_matches_the_published_count() {
        let c = CaeConfig::base();
        let g = encoder_macs(&c, 197) / 1e9;
        assert!((g - 17.6).abs() / 17.6 < 0.01, "{g} GMACs");
    }

    /// The DALL-E encoder at 112 px, counted layer by layer by hand for n_hid 256: input 7x7
    /// 3->256 at 112², then per group (side, n_in, n_out) the blocks' convolutions.
    #[test]
    fn dalle_count_matches_a_hand_count() {
        let t = DalleConfig::openai();
        let c = |a: f64, b: f64, k: f64, s: f64| a * b * k * k * s * s;
        let block = |n_in: f64, n_out: f64, s: f64| {
            let h = n_out / 4.0;
            (if n_in != n_out { c(n_in, n_out, 1.0, s) } else { 0.0 })
                + c(n_in, h, 3.0, s)
                + 2.0 * c(h, h, 3.0, s)
                + c(h, n_out, 1.0, s)
        };
        let want = c(3.0, 256.0, 7.0, 112.0)
            + block(256.0, 256.0, 112.0)
            + block(256.0, 256.0, 112.0)
            + block(256.0, 512.0, 56.0)
            + block(512.0, 512.0, 56.0)
            + block(512.0, 1024.0, 28.0)
            + block(1024.0, 1024.0, 28.0)
            + block(1024.0, 2048.0, 14.0)
            + block(2048.0, 2048.0, 14.0)
            + c(2048.0, 8192.0, 1.0, 14.0);
        assert_eq!(dalle_macs(&t, 112), want);
    }

    #[test]
    fn training_flops_grow_with_the_target_and_the_model() {
        let mut c = CaeConfig::base();
        c.target = TargetKind::Pixels;
        let pixels = train_flops_per_image(&c);
        c.target = TargetKind::Dalle;
        let dalle = train_flops_per_image(&c);
        assert!(dalle > pixels + 2.0 * dalle_macs(&c.tokenizer, 112) * 0.99);
        // Base: 3x the encoder on 122 tokens dominates: more than 3 x 2 x 10 GMACs.
        assert!(pixels > 60e9 && pixels < 200e9, "{pixels}");
        assert!(train_flops_per_image(&CaeConfig::micro()) < pixels / 100.0);
    }
}
