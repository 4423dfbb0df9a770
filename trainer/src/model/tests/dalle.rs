//! DALL-E encoder (spec §3) against a plain f64 convolution reference.

use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, backend::Backend};

use super::{B, device, images, max_abs_diff, randomize, to_vec, to_vec_i64};
use crate::model::dalle::{DalleBlock, DalleConfig};
use crate::model::encoder::count_params_lazy;

/// x: c×s×s (CHW) -> o×s×s, stride 1, zero padding (k-1)/2.
fn conv(x: &[f64], c: usize, s: usize, layer: &Conv2d<B>) -> Vec<f64> {
    let [o, ci, k, _] = layer.weight.val().dims();
    assert_eq!(ci, c);
    let w = to_vec(layer.weight.val());
    let b = to_vec(layer.bias.as_ref().unwrap().val());
    let p = (k - 1) as isize / 2;
    let mut y = vec![0.0; o * s * s];
    for oc in 0..o {
        for r in 0..s {
            for q in 0..s {
                let mut acc = b[oc] as f64;
                for ic in 0..c {
                    for i in 0..k {
                        for j in 0..k {
                            let (rr, qq) = (r as isize + i as isize - p, q as isize + j as isize - p);
                            if rr < 0 || qq < 0 || rr >= s as isize || qq >= s as isize {
                                continue;
                            }
                            acc +=
                                w[((oc * c + ic) * k + i) * k + j] as f64 * x[(ic * s + rr as usize) * s + qq as usize];
                        }
                    }
                }
                y[(oc * s + r) * s + q] = acc;
            }
        }
    }
    y
}

fn relu(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v.max(0.0)).collect()
}

fn block_ref(blk: &DalleBlock<B>, x: &[f64], c: usize, s: usize) -> (Vec<f64>, usize) {
    let h = blk.conv_1.weight.val().dims()[0];
    let n_out = blk.conv_4.weight.val().dims()[0];
    let id = match &blk.id_path {
        Some(l) => conv(x, c, s, l),
        None => x.to_vec(),
    };
    let r = conv(&relu(x), c, s, &blk.conv_1);
    let r = conv(&relu(&r), h, s, &blk.conv_2);
    let r = conv(&relu(&r), h, s, &blk.conv_3);
    let r = conv(&relu(&r), h, s, &blk.conv_4);
    (id.iter().zip(&r).map(|(a, b)| a + b * blk.post_gain).collect(), n_out)
}

fn pool(x: &[f64], c: usize, s: usize) -> Vec<f64> {
    let t = s / 2;
    let mut y = vec![f64::MIN; c * t * t];
    for ch in 0..c {
        for r in 0..s {
            for q in 0..s {
                let o = (ch * t + r / 2) * t + q / 2;
                y[o] = y[o].max(x[(ch * s + r) * s + q]);
            }
        }
    }
    y
}

#[test]
fn dalle_blocks_match_reference() {
    let dev = device();
    B::seed(&dev, 51);
    for (n_in, n_out) in [(8, 16), (16, 16)] {
        let blk = randomize(DalleBlock::<B>::new(n_in, n_out, 1.0 / 64.0, &dev), 0.3);
        assert_eq!(blk.id_path.is_some(), n_in != n_out);
        let x = images::<B>(1, 6, 52, &dev).repeat_dim(1, n_in.div_ceil(3)).narrow(1, 0, n_in);
        let got = to_vec(blk.forward(x.clone()));
        let xs: Vec<f64> = to_vec(x).into_iter().map(f64::from).collect();
        let (want, _) = block_ref(&blk, &xs, n_in, 6);
        assert!(max_abs_diff(&got, &want) < 1e-4, "block {n_in}->{n_out}");
    }
}

#[test]
fn micro_dalle_logits_and_tokens_match_reference() {
    let dev = device();
    B::seed(&dev, 61);
    let enc = DalleConfig::micro().init::<B>(&dev);
    let enc = randomize(enc, 0.05);
    let x = images::<B>(1, 16, 62, &dev);
    let got = to_vec(enc.logits(x.clone())); // [1, 512, 2, 2]
    let ids = to_vec_i64(enc.tokens(x.clone()));
    let xs: Vec<f64> = to_vec(x).into_iter().map(f64::from).collect();
    let mut h = conv(&xs, 3, 16, &enc.input);
    let (mut c, mut s) = (64usize, 16usize);
    for g in &enc.groups {
        for blk in &g.blocks {
            let (y, n_out) = block_ref(blk, &h, c, s);
            h = y;
            c = n_out;
        }
        if g.pool {
            h = pool(&h, c, s);
            s /= 2;
        }
    }
    assert_eq!((c, s), (512, 2));
    let want = conv(&relu(&h), c, s, &enc.output);
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&got, &want) < 1e-4 * scale.max(1.0), "logits differ (scale {scale})");
    // Tokens = first argmax over channels per cell, where the reference is not near a tie.
    let mut checked = 0;
    for cell in 0..4 {
        let col: Vec<f64> = (0..512).map(|v| want[v * 4 + cell]).collect();
        let best = col.iter().cloned().fold(f64::MIN, f64::max);
        let first = col.iter().position(|&v| v == best).unwrap();
        let runner_up = col.iter().enumerate().filter(|&(i, _)| i != first).map(|(_, &v)| v).fold(f64::MIN, f64::max);
        if best - runner_up > 1e-3 * scale.max(1.0) {
            assert_eq!(ids[cell], first as i64, "cell {cell}");
            checked += 1;
        }
    }
    assert!(checked >= 2, "too many near-ties to check the tokens");
}

#[test]
fn openai_dalle_stage_shapes_on_112() {
    // spec §3 table, batch 2 at the real size (n_hid 256, vocab 8192).
    let dev = device();
    let enc = DalleConfig::openai().init::<B>(&dev);
    assert_eq!(count_params_lazy(&enc), 53_786_240);
    let x = images::<B>(2, 112, 71, &dev);
    let mut h: Tensor<B, 4> = enc.input.forward(x.clone());
    let mut shapes = vec![h.dims()];
    for g in &enc.groups {
        for blk in &g.blocks {
            h = blk.forward(h);
        }
        if g.pool {
            h = burn::tensor::module::max_pool2d(h, [2, 2], [2, 2], [0, 0], [1, 1], false);
        }
        shapes.push(h.dims());
    }
    assert_eq!(
        shapes,
        vec![[2, 256, 112, 112], [2, 256, 56, 56], [2, 512, 28, 28], [2, 1024, 14, 14], [2, 2048, 14, 14]]
    );
    assert_eq!(enc.output.forward(h).dims(), [2, 8192, 14, 14]);
    assert_eq!(enc.tokens(x).dims(), [2, 196]);
}
