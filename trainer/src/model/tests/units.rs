//! Small unit tests: position table, config, masks, pixel targets, attention invariances.

use burn::tensor::{Distribution, Int, Tensor, TensorData, backend::Backend};

use super::{B, device, max_abs_diff, randomize, to_vec, to_vec_i64};
use crate::CaeError;
use crate::model::attention::Attention;
use crate::model::encoder::Encoder;
use crate::model::pos_embed::{sincos_pos_embed, sincos_table};
use crate::model::{CaeConfig, TargetKind, mask_to_indices, pixel_targets, pixel_targets_eps, raw_pixel_targets};

#[test]
fn sincos_table_matches_formula_base_grid() {
    // spec §2.1: P = D/4, ω_d = 10000^(-d/P); [sin(row ω), cos(row ω), sin(col ω), cos(col ω)].
    let (grid, d) = (14usize, 768usize);
    let table = sincos_table(grid, d);
    assert_eq!(table.len(), 197 * 768);
    assert!(table[..d].iter().all(|&v| v == 0.0), "cls row must be zeros");
    let p = d / 4;
    let mut expected = vec![0.0f64; 197 * 768];
    for t in 0..196 {
        let row = (t / 14) as f64;
        let col = (t % 14) as f64;
        for i in 0..p {
            let omega = (-(i as f64) / p as f64 * 10000f64.ln()).exp();
            expected[(1 + t) * d + i] = (row * omega).sin();
            expected[(1 + t) * d + p + i] = (row * omega).cos();
            expected[(1 + t) * d + 2 * p + i] = (col * omega).sin();
            expected[(1 + t) * d + 3 * p + i] = (col * omega).cos();
        }
    }
    let err = max_abs_diff(&table, &expected);
    assert!(err < 2e-5, "max abs error {err}");
    // Row/col convention: patch 1 is row 0, col 1 -> its first block is sin(0) = 0 and its
    // third block starts with sin(1·ω_0) = sin(1).
    assert_eq!(table[2 * d], 0.0);
    assert!((table[2 * d + 2 * p] as f64 - 1f64.sin()).abs() < 1e-6);
    // Patch 14 is row 1, col 0.
    assert!((table[15 * d] as f64 - 1f64.sin()).abs() < 1e-6);
    assert_eq!(table[15 * d + 2 * p], 0.0);
}

#[test]
fn pos_embed_tensor_is_constant_and_shaped() {
    let pe = sincos_pos_embed::<super::AB>(4, 64, &device());
    assert_eq!(pe.dims(), [17, 64]);
    assert!(!pe.is_require_grad());
}

#[test]
fn presets_validate_and_have_spec_shapes() {
    for (name, c) in [
        ("base", CaeConfig::base()),
        ("small", CaeConfig::small()),
        ("tiny", CaeConfig::tiny()),
        ("micro", CaeConfig::micro()),
    ] {
        c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let b = CaeConfig::base();
    assert_eq!((b.num_patches(), b.num_visible(), b.head_dim(), b.target_view_size()), (196, 121, 64, 112));
    let m = CaeConfig::micro();
    assert_eq!((m.num_patches(), m.num_visible(), m.head_dim(), m.target_view_size()), (16, 10, 32, 32));
    let t = CaeConfig::tiny();
    assert_eq!((t.embed_dim, t.num_heads, t.mlp_dim, t.head_dim()), (192, 3, 768, 64));
    let authors = CaeConfig { num_mask: 98, drop_path: 0.1, ..CaeConfig::base() };
    authors.validate().unwrap();
}

#[test]
fn invalid_configs_are_rejected() {
    let bad = [
        CaeConfig { num_mask: 196, ..CaeConfig::base() },
        CaeConfig { num_heads: 5, ..CaeConfig::base() },
        CaeConfig { img_size: 100, ..CaeConfig::base() },
        CaeConfig { vocab_size: 1000, ..CaeConfig::base() },
        CaeConfig { drop_path: 1.0, ..CaeConfig::base() },
        CaeConfig { patch_size: 8, ..CaeConfig::base() }, // tokenizer grid 14 != patch grid 28
    ];
    for c in bad {
        assert!(matches!(c.validate(), Err(CaeError::Config(_))), "{c:?} should be rejected");
    }
    // Pixel target does not need the tokenizer grid to match.
    let pix = CaeConfig { patch_size: 8, target: TargetKind::Pixels, ..CaeConfig::micro() };
    pix.validate().unwrap();
    assert_eq!(pix.head_out_dim(), 8 * 8 * 3);
}

#[test]
fn config_serde_roundtrip_and_unknown_fields() {
    let c = CaeConfig::micro();
    let json = serde_json::to_string(&c).unwrap();
    assert!(json.contains("\"target\":\"dalle\""));
    let back: CaeConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    let with_extra = json.replacen('{', "{\"mlp_ratio\":4,", 1);
    assert!(serde_json::from_str::<CaeConfig>(&with_extra).is_err());
}

#[test]
fn mask_to_indices_splits_sorted_and_checks_count() {
    let mut mask = vec![false; 2 * 16];
    for i in [1, 3, 4, 9, 10, 15] {
        mask[i] = true;
    }
    for i in [0, 2, 5, 6, 7, 8] {
        mask[16 + i] = true;
    }
    let (vis, msk) = mask_to_indices(&mask, 2, 16, 6).unwrap();
    assert_eq!(msk, vec![1, 3, 4, 9, 10, 15, 0, 2, 5, 6, 7, 8]);
    assert_eq!(&vis[..10], &[0, 2, 5, 6, 7, 8, 11, 12, 13, 14]);
    assert_eq!(&vis[10..], &[1, 3, 4, 9, 10, 11, 12, 13, 14, 15]);

    mask[0] = true; // sample 0 now has 7
    assert!(matches!(mask_to_indices(&mask, 2, 16, 6), Err(CaeError::Mask { sample: 0, .. })));
    assert!(matches!(mask_to_indices(&mask[..20], 2, 16, 6), Err(CaeError::Mask { .. })));
}

#[test]
fn pixel_targets_patchify_order_and_normalisation() {
    let dev = device();
    let (b, s, p) = (2usize, 8usize, 4usize);
    let values: Vec<f32> = (0..b * 3 * s * s).map(|i| ((i * 37) % 101) as f32 / 7.0).collect();
    let img = Tensor::<B, 4>::from_data(TensorData::new(values.clone(), [b, 3, s, s]), &dev);
    let out = to_vec(pixel_targets(img, p));
    let pp = p * p * 3;
    assert_eq!(out.len(), b * 4 * pp);
    for bi in 0..b {
        for t in 0..4 {
            let (r0, c0) = ((t / 2) * p, (t % 2) * p);
            // Raw patch in (row, col, channel) order, normalised by hand.
            let raw: Vec<f64> = (0..p)
                .flat_map(|r| (0..p).flat_map(move |c| (0..3).map(move |ch| (r, c, ch))))
                .map(|(r, c, ch)| values[((bi * 3 + ch) * s + r0 + r) * s + c0 + c] as f64)
                .collect();
            let mean = raw.iter().sum::<f64>() / pp as f64;
            let var = raw.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (pp as f64 - 1.0);
            let want: Vec<f64> = raw.iter().map(|v| (v - mean) / (var + 1e-6).sqrt()).collect();
            let got = &out[(bi * 4 + t) * pp..(bi * 4 + t + 1) * pp];
            assert!(max_abs_diff(got, &want) < 1e-4, "sample {bi} patch {t}");
        }
    }
}

#[test]
fn pixel_target_floor_and_raw_targets() {
    let dev = device();
    let (b, s, p) = (1usize, 8usize, 4usize);
    let values: Vec<f32> = (0..b * 3 * s * s).map(|i| ((i * 53) % 89) as f32 / 40.0).collect();
    let img = || Tensor::<B, 4>::from_data(TensorData::new(values.clone(), [b, 3, s, s]), &dev);
    let raw = to_vec(raw_pixel_targets(img(), p));
    let pp = p * p * 3;
    // Raw: the patch's pixels in (row, col, channel) order, untouched.
    for t in 0..4 {
        let (r0, c0) = ((t / 2) * p, (t % 2) * p);
        let want: Vec<f64> = (0..p)
            .flat_map(|r| (0..p).flat_map(move |c| (0..3).map(move |ch| (r, c, ch))))
            .map(|(r, c, ch)| values[(ch * s + r0 + r) * s + c0 + c] as f64)
            .collect();
        assert!(max_abs_diff(&raw[t * pp..(t + 1) * pp], &want) < 1e-6, "patch {t}");
    }
    // Floored: (x - mean) / sqrt(var + eps), from the raw values.
    let eps = 0.3;
    let floored = to_vec(pixel_targets_eps(img(), p, eps));
    for t in 0..4 {
        let x: Vec<f64> = raw[t * pp..(t + 1) * pp].iter().map(|&v| v as f64).collect();
        let mean = x.iter().sum::<f64>() / pp as f64;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (pp as f64 - 1.0);
        let want: Vec<f64> = x.iter().map(|v| (v - mean) / (var + eps).sqrt()).collect();
        assert!(max_abs_diff(&floored[t * pp..(t + 1) * pp], &want) < 1e-4, "patch {t}");
    }
    // The floor damps a flat patch's noise instead of blowing it up to unit variance.
    let flat: Vec<f32> = (0..3 * 4 * 4).map(|i| 0.5 + 0.01 * ((i % 3) as f32 - 1.0)).collect();
    let flat = || Tensor::<B, 4>::from_data(TensorData::new(flat.clone(), [1, 3, 4, 4]), &dev);
    let rms = |v: Vec<f32>| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    assert!(rms(to_vec(pixel_targets(flat(), 4))) > 0.9);
    assert!(rms(to_vec(pixel_targets_eps(flat(), 4, 0.3))) < 0.05);
}

#[test]
fn argmax_takes_first_maximum_on_ties() {
    // The tokenizer relies on the backend's argmax returning the first maximum (spec §3).
    let dev = device();
    let mut v = vec![0.0f32; 4 * 2];
    // [1, 4 channels, 1, 2]: position 0 has a tie between channels 1 and 3, position 1 between 0 and 2.
    v[2] = 5.0;
    v[6] = 5.0;
    v[1] = 3.0;
    v[5] = 3.0;
    let t = Tensor::<B, 4>::from_data(TensorData::new(v, [1, 4, 1, 2]), &dev);
    let idx = to_vec_i64(t.argmax(1).reshape([1, 2]));
    assert_eq!(idx, vec![1, 0]);
}

#[test]
fn k_bias_cancels_in_attention() {
    // spec §2.4: a k bias adds q·b_k to a whole row of logits, which the softmax removes.
    let dev = device();
    B::seed(&dev, 7);
    let attn = randomize(Attention::<B>::new(64, 2, &dev), 0.3);
    let x = Tensor::<B, 3>::random([2, 11, 64], Distribution::Normal(0.0, 1.0), &dev);
    let base = to_vec(attn.forward(x.clone()));
    let qb = attn.q_bias.val();
    let vb = attn.v_bias.val();
    let kb = Tensor::<B, 1>::random([64], Distribution::Normal(0.0, 2.0), &dev);
    let with_k = to_vec(attn.forward_with_qkv_bias(x.clone(), Tensor::cat(vec![qb.clone(), kb, vb.clone()], 0)));
    let base64: Vec<f64> = base.iter().map(|&v| v as f64).collect();
    assert!(max_abs_diff(&with_k, &base64) < 1e-4);
    // Control: the same perturbation on the q part does change the output.
    let qpert = Tensor::<B, 1>::random([64], Distribution::Normal(0.0, 2.0), &dev);
    let with_q = to_vec(attn.forward_with_qkv_bias(x, Tensor::cat(vec![qpert, Tensor::zeros([64], &dev), vb], 0)));
    assert!(max_abs_diff(&with_q, &base64) > 1e-2);
}

#[test]
fn pos_at_gathers_rows_of_the_table() {
    let dev = device();
    let c = CaeConfig::micro();
    let enc = Encoder::<B>::new(&c, &dev);
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![3i64, 0, 15, 7, 7, 1], [2, 3]), &dev);
    let got = to_vec(enc.pos_at(idx));
    let table = sincos_table(4, 64);
    let want: Vec<f64> = [3usize, 0, 15, 7, 7, 1]
        .iter()
        .flat_map(|&t| table[(1 + t) * 64..(2 + t) * 64].iter().map(|&v| v as f64))
        .collect();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
}

#[test]
fn drop_path_drops_whole_samples_only_under_autodiff() {
    use crate::model::block::{drop_path, drop_path_schedule};
    let dev = device();
    assert_eq!(drop_path_schedule(0.1, 3), vec![0.0, 0.05, 0.1]);
    assert_eq!(drop_path_schedule(0.1, 1), vec![0.0]);
    let x = Tensor::<B, 3>::ones([64, 2, 3], &dev);
    assert_eq!(to_vec(drop_path(x, 0.5)), vec![1.0; 384], "no autodiff: identity");
    super::AB::seed(&dev, 3);
    let x = Tensor::<super::AB, 3>::ones([64, 2, 3], &dev);
    let y = to_vec(drop_path(x.clone(), 0.5));
    let mut dropped = 0;
    for s in y.chunks(6) {
        assert!(s.iter().all(|&v| v == s[0]) && (s[0] == 0.0 || s[0] == 2.0), "sample {s:?}");
        dropped += usize::from(s[0] == 0.0);
    }
    assert!((10..=54).contains(&dropped), "{dropped} of 64 dropped at p = 0.5");
    assert_eq!(to_vec(drop_path(x, 0.0)), vec![1.0; 384]);
}

#[test]
fn layer_norms_use_eps_1e6() {
    // Input with variance 1e-6: LN gives x/√(1e-6 + eps) = ±1/√2 with eps = 1e-6 (±0.30 with
    // torch's default 1e-5), so this pins the epsilon of every LN kind in the model.
    let dev = device();
    let model = crate::model::Cae::<B>::new(&CaeConfig::micro(), &dev).unwrap();
    let x = Tensor::<B, 3>::from_data(
        TensorData::new((0..64).map(|i| if i % 2 == 0 { 1e-3f32 } else { -1e-3 }).collect::<Vec<_>>(), [1, 1, 64]),
        &dev,
    );
    // Each LN with the epsilon its owner passes to the fused kernel (burn's own is private).
    let lns = [
        (&model.encoder.layers[0].ln1, model.encoder.layers[0].ln_eps),
        (&model.encoder.ln1, model.encoder.ln_eps),
        (&model.regressor.layers[0].norm1_k, model.regressor.layers[0].ln_eps),
        (&model.regressor.layers[0].norm2, model.regressor.layers[0].ln_eps),
        (&model.regressor.norm_regressor, model.regressor.ln_eps),
        (&model.decoder.norm_decoder, model.decoder.ln_eps),
    ];
    for (ln, eps) in lns {
        let burn = to_vec(ln.forward(x.clone()));
        let fused = to_vec(crate::model::fused::layer_norm(ln, eps, x.clone()));
        for y in [burn[0], fused[0]] {
            assert!((y as f64 - 0.5f64.sqrt()).abs() < 1e-3, "LN output {y} (eps not 1e-6?)");
        }
    }
}
