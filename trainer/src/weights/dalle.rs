//! Loading the DALL-E tokenizer's weights (spec §3) from the official `dalle_encoder.pth` (a plain
//! PyTorch `state_dict`, zip or legacy pickle; parsed, never executed) or from a safetensors file
//! with the same key names.
//!
//! Key mapping (PyTorch -> ours): `blocks.input.{w,b}` -> `input.{weight,bias}`;
//! `blocks.group_G.block_K.res_path.conv_I.{w,b}` -> `groups.(G-1).blocks.(K-1).conv_I.{weight,bias}`;
//! `blocks.group_G.block_K.id_path.{w,b}` -> `groups.(G-1).blocks.(K-1).id_path.{weight,bias}`;
//! `blocks.output.conv.{w,b}` -> `output.{weight,bias}`. Conv weights are `[out, in, k, k]` on
//! both sides, so nothing is transposed. Every tensor must be used and every parameter loaded.

use std::path::Path;

use burn::module::Module;
use burn::prelude::Backend;
use burn_store::{ModuleSnapshot, PytorchStore, SafetensorsStore};

use crate::error::CaeError;
use crate::model::DalleEncoder;

/// Where the reference setup tells users to put the official weights.
pub const DEFAULT_DALLE_PATH: &str = "cae_ckpt/dalle_encoder.pth";

fn remaps() -> Vec<(String, String)> {
    let mut v = vec![
        (r"^blocks\.input\.".to_string(), "input.".to_string()),
        (r"^blocks\.output\.conv\.".to_string(), "output.".to_string()),
        (r"\.res_path\.".to_string(), ".".to_string()),
        (r"\.w$".to_string(), ".weight".to_string()),
        (r"\.b$".to_string(), ".bias".to_string()),
    ];
    for g in 1..=8 {
        v.push((format!(r"^blocks\.group_{g}\."), format!("groups.{}.", g - 1)));
    }
    for k in 1..=8 {
        v.push((format!(r"\.block_{k}\."), format!(".blocks.{}.", k - 1)));
    }
    v
}

/// Loads weights into `encoder` (built with the matching [`crate::model::DalleConfig`]) and
/// returns it frozen. Fails, naming the file, when a tensor is missing, unused or misshapen.
pub fn load_dalle<B: Backend>(mut encoder: DalleEncoder<B>, path: &Path) -> Result<DalleEncoder<B>, CaeError> {
    let err = |reason: String| CaeError::Weights { path: path.display().to_string(), reason };
    if !path.is_file() {
        return Err(err(format!(
            "not found. Download the official DALL-E encoder weights and put them at {DEFAULT_DALLE_PATH} \
             (or pass the path), or use the `pixels` target"
        )));
    }
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let result = if is_safetensors {
        let mut store = SafetensorsStore::from_file(path).validate(true).allow_partial(false);
        for (from, to) in remaps() {
            store = store.with_key_remapping(from, to);
        }
        encoder.load_from(&mut store).map_err(|e| err(e.to_string()))?
    } else {
        super::torch_file::check(path, super::torch_file::DALLE_BOUND)?;
        let mut store = PytorchStore::from_file(path).validate(true).allow_partial(false);
        for (from, to) in remaps() {
            store = store.with_key_remapping(from, to);
        }
        encoder.load_from(&mut store).map_err(|e| err(e.to_string()))?
    };
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(err(format!(
            "does not fit the tokenizer: missing {:?}, unused {:?}, errors {:?}",
            result.missing.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            result.unused,
            result.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
        )));
    }
    Ok(encoder.no_grad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DalleConfig, map_pixels};
    use burn::tensor::{Tensor, TensorData};

    type B = burn::backend::Flex;

    const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

    /// The same pixels as `tools/py/make_dalle_golden.py`'s `image(b)`, CHW in [0, 1].
    fn image(b: usize, s: usize) -> Vec<f32> {
        let mut out = vec![0f32; 3 * s * s];
        for y in 0..s {
            for x in 0..s {
                for c in 0..3 {
                    let v = ((x * (7 + 5 * b) + y * (3 + b) + c * 50) * (1 + (x ^ y) % 3)) % 256;
                    out[c * s * s + y * s + x] = v as f32 / 255.0;
                }
            }
        }
        out
    }

    #[test]
    fn pth_from_the_reference_implementation_gives_its_logits_and_tokens() {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{GOLDEN}/dalle_micro.json")).unwrap()).unwrap();
        let s = meta["size"].as_u64().unwrap() as usize;
        let device = Default::default();
        let cfg = DalleConfig::micro();
        let enc = load_dalle(cfg.init::<B>(&device), Path::new(&format!("{GOLDEN}/dalle_micro.pth"))).unwrap();
        let pixels: Vec<f32> = (0..2).flat_map(|b| image(b, s)).collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(pixels, [2, 3, s, s]), &device);
        let logits = enc.logits(map_pixels(x));
        let got: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let want: Vec<f32> = std::fs::read(format!("{GOLDEN}/dalle_micro_logits.f32"))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(max_diff <= 1e-4 * scale.max(1.0), "logits differ from PyTorch by {max_diff} (scale {scale})");
        // Tokens agree wherever the reference's top-2 margin is not a near-tie.
        let tokens: Vec<i64> = enc
            .tokens(map_pixels(Tensor::<B, 4>::from_data(
                TensorData::new((0..2).flat_map(|b| image(b, s)).collect::<Vec<f32>>(), [2, 3, s, s]),
                &device,
            )))
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        let want_tokens: Vec<i64> = meta["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
            .collect();
        let margins: Vec<f64> = meta["top2_margins"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        for ((t, w), m) in tokens.iter().zip(&want_tokens).zip(&margins) {
            if *m > 1e-3 {
                assert_eq!(t, w, "token differs where the reference margin is {m}");
            }
        }
    }

    #[test]
    fn missing_or_mismatched_weights_are_clear_errors() {
        let device = Default::default();
        let e = load_dalle(DalleConfig::micro().init::<B>(&device), Path::new("/nonexistent/dalle_encoder.pth"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/dalle_encoder.pth") && e.contains(DEFAULT_DALLE_PATH), "{e}");
        // A tokenizer of another width does not fit the file.
        let wide = DalleConfig { n_hid: 128, vocab_size: 512, ..DalleConfig::micro() };
        let e = load_dalle(wide.init::<B>(&device), Path::new(&format!("{GOLDEN}/dalle_micro.pth")));
        assert!(e.is_err());
    }
}
