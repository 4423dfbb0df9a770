//! Import of mmselfsup 0.x CAE checkpoints (spec §5 "Released pretrain checkpoint"): a torch
//! pickle (legacy or zip; parsed, never executed), either the full algorithm state
//! `{meta, state_dict: {backbone.*, teacher.*, neck.*, head.*}}` or the extracted encoder
//! `{state_dict: {cls_token, layers.*, ...}, author}` that mmselfsup's model zoo publishes
//! (`extract_backbone_weights.py`: the `backbone.` prefix stripped, teacher and neck dropped).
//!
//! Key mapping (mmselfsup -> ours; Linear weights are transposed, LayerNorm weight/bias become
//! gamma/beta by burn-store's PyTorch adapter):
//!
//! | mmselfsup | ours |
//! |---|---|
//! | `backbone.X` (or unprefixed `X`) / `teacher.X` | `encoder.X` / `teacher.X` |
//! | `*.ffn.layers.0.0` / `*.ffn.layers.1` | `*.ffn.fc1` / `*.ffn.fc2` |
//! | `neck.mask_token` | `regressor.mask_token` |
//! | `neck.regressors.i.{norm1_q,norm1_k,norm1_v,norm2,gamma_1,gamma_2}_cross` | `regressor.layers.i.{...}` (no `_cross`) |
//! | `neck.regressors.i.cross_attn.*` | `regressor.layers.i.cross_attn.*` |
//! | `neck.norm_regressor` | `regressor.norm_regressor` |
//! | `neck.decoders.i.*` | `decoder.layers.i.*` |
//! | `neck.norm_decoder`, `neck.head` | `decoder.norm_decoder`, `decoder.head` |
//!
//! - Decoder attention bias: mmselfsup v0.9.0 stores `attn.q_bias`/`attn.v_bias` (loaded as they
//!   are); 0.x HEAD stores a full `attn.qkv.bias` `[3D]`: q = `[0, D)`, v = `[2D, 3D)`, and the k
//!   part is dropped — it adds the same value to every logit of a row and cancels in the softmax
//!   (spec §2.4).
//! - `pos_embed` is not loaded (ours is the fixed sin-cos table of spec §2.1); the file's table is
//!   compared with ours and a difference is an error (another image size or grid).
//! - `head.*` (the DALL-E tokenizer inside the algorithm) is ignored: the tokenizer comes from
//!   `dalle_encoder.pth`.
//! - A file without `teacher.*` gives a teacher that is a copy of the encoder (as at init); one
//!   without `neck.*` leaves the regressor and decoder freshly initialised, and says so.

use std::path::Path;

use burn::module::{Module, Param};
use burn::prelude::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_store::pytorch::PytorchReader;
use burn_store::{ModuleSnapshot, PytorchStore};

use crate::error::CaeError;
use crate::model::Cae;
use crate::model::encoder::copy_params_frozen;

/// What an import found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    /// `full` ({meta, state_dict} with backbone/teacher/neck) or `backbone` (extracted encoder).
    pub form: &'static str,
    /// Tensors loaded into the model.
    pub loaded: usize,
    /// The teacher came from the file (else: a copy of the encoder).
    pub teacher: bool,
    /// The regressor and decoder came from the file (else: freshly initialised).
    pub neck: bool,
    /// The decoder's attention biases were split from a full `qkv.bias` (0.x HEAD layout).
    pub split_qkv_bias: bool,
    /// File keys deliberately not loaded (`head.*`, `pos_embed`).
    pub ignored: Vec<String>,
}

/// A PyTorch pickle by its extension (`.pth`, `.pt`, `.pth.tar`): an mmselfsup checkpoint to
/// import rather than one of ours.
pub fn is_torch_checkpoint(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "pth" || e == "pt" || e == "tar")
}

/// Embed dim and depth of the encoder stored in an mmselfsup file (to pick a preset).
pub fn probe_mmselfsup(path: &Path) -> Result<(usize, usize), CaeError> {
    let (reader, keys, top) = keys_of(path)?;
    let prefix = if keys.iter().any(|k| k.starts_with("backbone.")) { "backbone." } else { "" };
    let cls = reader
        .get(&format!("{}{prefix}cls_token", wrapped(&top)))
        .ok_or_else(|| werr(path, format!("no {prefix}cls_token: not an mmselfsup CAE checkpoint")))?;
    let dim = cls.shape.as_slice().last().copied().unwrap_or(0);
    let depth = (0..).take_while(|i| keys.iter().any(|k| k.starts_with(&format!("{prefix}layers.{i}.")))).count();
    Ok((dim, depth))
}

fn werr(path: &Path, reason: String) -> CaeError {
    CaeError::Weights { path: path.display().to_string(), reason }
}

fn open(path: &Path) -> Result<PytorchReader, CaeError> {
    super::torch_file::check(path, super::torch_file::MMSELFSUP_BOUND)?;
    PytorchReader::new(path).map_err(|e| werr(path, format!("not a readable torch checkpoint: {e}")))
}

/// The parsed file (tensor data is read lazily), its tensor keys (relative to `state_dict` when
/// the file wraps one) and that wrapper key.
fn keys_of(path: &Path) -> Result<(PytorchReader, Vec<String>, Option<String>), CaeError> {
    if !path.is_file() {
        return Err(werr(path, "no such file".into()));
    }
    let reader = open(path)?;
    let all = reader.keys();
    if all.iter().any(|k| k.starts_with("state_dict.")) {
        let keys = all.iter().filter_map(|k| k.strip_prefix("state_dict.")).map(str::to_string).collect();
        Ok((reader, keys, Some("state_dict".into())))
    } else {
        Ok((reader, all, None))
    }
}

/// What precedes a relative key in the reader (`state_dict.` for a wrapped state dict).
fn wrapped(top: &Option<String>) -> String {
    top.as_ref().map(|t| format!("{t}.")).unwrap_or_default()
}

/// File keys that are not loaded by the store: the tokenizer (`head.*`), the fixed position
/// table (checked separately) and full qkv biases (split separately).
fn not_loaded(key: &str) -> bool {
    key.starts_with("head.") || key.ends_with("pos_embed") || key.ends_with(".attn.qkv.bias")
}

fn remaps(backbone_only: bool) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        (r"^backbone\.", "encoder."),
        (r"^neck\.mask_token$", "regressor.mask_token"),
        (r"^neck\.regressors\.", "regressor.layers."),
        (r"^neck\.norm_regressor\.", "regressor.norm_regressor."),
        (r"^neck\.decoders\.", "decoder.layers."),
        (r"^neck\.norm_decoder\.", "decoder.norm_decoder."),
        (r"^neck\.head\.", "decoder.head."),
        (r"_cross\.", "."),
        (r"_cross$", ""),
        (r"\.ffn\.layers\.0\.0\.", ".ffn.fc1."),
        (r"\.ffn\.layers\.1\.", ".ffn.fc2."),
        // burn's LayerNorm holds gamma/beta.
        (r"\.(ln1|ln2|norm1_q|norm1_k|norm1_v|norm2|norm_regressor|norm_decoder)\.weight$", ".$1.gamma"),
        (r"\.(ln1|ln2|norm1_q|norm1_k|norm1_v|norm2|norm_regressor|norm_decoder)\.bias$", ".$1.beta"),
    ];
    if backbone_only {
        v.insert(0, (r"^(cls_token|pos_embed|patch_embed\.|layers\.|ln1\.)", "encoder.$1"));
    }
    v
}

/// Loads an mmselfsup CAE checkpoint into `model` (built with the matching config). Fails,
/// naming the file, when a tensor is misshapen, a model parameter has no source, or the file
/// holds tensors that fit nowhere.
pub fn load_mmselfsup<B: Backend>(model: Cae<B>, path: &Path) -> Result<(Cae<B>, ImportReport), CaeError> {
    let (reader, keys, top) = keys_of(path)?;
    let pre = wrapped(&top);
    let full = keys.iter().any(|k| k.starts_with("backbone."));
    let backbone_only = !full && keys.iter().any(|k| k == "cls_token");
    if !full && !backbone_only {
        return Err(werr(path, "neither backbone.* nor cls_token keys: not an mmselfsup CAE checkpoint".into()));
    }
    let has_teacher = keys.iter().any(|k| k.starts_with("teacher."));
    let has_neck = keys.iter().any(|k| k.starts_with("neck."));
    let split_qkv_bias = keys.iter().any(|k| k.starts_with("neck.decoders.") && k.ends_with(".attn.qkv.bias"));
    let ignored: Vec<String> = keys.iter().filter(|k| not_loaded(k)).cloned().collect();

    // The file's sin-cos table must be ours (same grid and width).
    let pos_key = if full { "backbone.pos_embed" } else { "pos_embed" };
    if let Some(snap) = reader.get(&format!("{pre}{pos_key}")) {
        let theirs = snap
            .to_data()
            .map_err(|e| werr(path, format!("{pos_key}: {e}")))?
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| werr(path, format!("{pos_key}: {e:?}")))?;
        let ours = model.encoder.pos_embed.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        if theirs.len() != ours.len() {
            return Err(werr(
                path,
                format!("{pos_key} has {} values, the model's {}: another image size?", theirs.len(), ours.len()),
            ));
        }
        let diff = theirs.iter().zip(&ours).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        if diff > 1e-4 {
            return Err(werr(path, format!("{pos_key} is not the 2-D sin-cos table of spec §2.1 (max diff {diff})")));
        }
    }

    let mut store =
        PytorchStore::from_file(path).validate(true).allow_partial(true).map_indices_contiguous(false).with_predicate(
            |p, _| !(p.starts_with("head.") || p.ends_with("pos_embed") || p.ends_with(".attn.qkv.bias")),
        );
    if let Some(t) = &top {
        store = store.with_top_level_key(t.clone());
    }
    for (from, to) in remaps(backbone_only) {
        store = store.with_key_remapping(from, to);
    }
    let mut model = model;
    let result = model.load_from(&mut store).map_err(|e| werr(path, e.to_string()))?;
    if !result.errors.is_empty() {
        let errs: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
        return Err(werr(path, format!("does not fit the model: {errs:?}")));
    }
    let unused: Vec<&String> = result.unused.iter().filter(|p| !not_loaded(p)).collect();
    if !unused.is_empty() {
        return Err(werr(path, format!("tensors that fit nowhere in the model: {unused:?}")));
    }
    let allowed_missing = |p: &str| {
        (p.starts_with("teacher.") && !has_teacher)
            || ((p.starts_with("regressor.") || p.starts_with("decoder.")) && !has_neck)
            || (split_qkv_bias && p.starts_with("decoder.layers.") && (p.ends_with("q_bias") || p.ends_with("v_bias")))
    };
    let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).filter(|p| !allowed_missing(p)).collect();
    if !missing.is_empty() {
        return Err(werr(path, format!("model parameters missing from the file: {missing:?}")));
    }

    if split_qkv_bias {
        let device = model.encoder.cls_token.val().device();
        for (i, layer) in model.decoder.layers.iter_mut().enumerate() {
            let key = format!("neck.decoders.{i}.attn.qkv.bias");
            let snap = reader.get(&format!("{pre}{key}")).ok_or_else(|| werr(path, format!("{key} missing")))?;
            let v = snap
                .to_data()
                .map_err(|e| werr(path, format!("{key}: {e}")))?
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| werr(path, format!("{key}: {e:?}")))?;
            let d = layer.attn.q_bias.lazy_shape().num_elements();
            if v.len() != 3 * d {
                return Err(werr(path, format!("{key} has {} values, expected 3 x {d}", v.len())));
            }
            let t = |range: std::ops::Range<usize>| {
                Tensor::<B, 1>::from_data(TensorData::new(v[range].to_vec(), [d]), &device)
            };
            layer.attn.q_bias = Param::initialized(layer.attn.q_bias.id, t(0..d).require_grad());
            layer.attn.v_bias = Param::initialized(layer.attn.v_bias.id, t(2 * d..3 * d).require_grad());
        }
    }
    if has_teacher {
        model.teacher = model.teacher.no_grad();
    } else {
        model.teacher = copy_params_frozen(&model.encoder, model.teacher);
    }
    let report = ImportReport {
        form: if full { "full" } else { "backbone" },
        loaded: result.applied.len() + if split_qkv_bias { 2 * model.decoder.layers.len() } else { 0 },
        teacher: has_teacher,
        neck: has_neck,
        split_qkv_bias,
        ignored,
    };
    Ok((model, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CaeConfig;
    use burn::backend::Flex;
    use burn::tensor::Int;

    type B = Flex;
    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

    fn golden(name: &str) -> Vec<f32> {
        let bytes = std::fs::read(format!("{DIR}/cae_mmselfsup_micro_{name}.f32")).unwrap();
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn meta() -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/cae_mmselfsup_micro.json")).unwrap()).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    fn import(file: &str) -> (Cae<B>, ImportReport) {
        let device = Default::default();
        let model = Cae::<B>::new(&CaeConfig::micro(), &device).unwrap();
        load_mmselfsup(model, Path::new(&format!("{DIR}/{file}"))).unwrap()
    }

    /// The imported net reproduces the reference outputs of tools/py/make_mmselfsup_golden.py
    /// (an independent float64 torch implementation of spec §2.1-§2.4 on the same weights).
    fn check_outputs(model: &Cae<B>) {
        let m = meta();
        let device = Default::default();
        let idx = |k: &str| -> Tensor<B, 2, Int> {
            let v: Vec<i64> = m[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            let n = v.len();
            Tensor::from_data(TensorData::new(v, [1, n]), &device)
        };
        let img = Tensor::<B, 4>::from_data(TensorData::new(golden("input"), [1, 3, 64, 64]), &device);
        let n = 16;
        let all = Tensor::<B, 1, Int>::arange(0..n, &device).unsqueeze::<2>();
        let enc = model.encoder.forward(img.clone(), all);
        assert!(max_diff(&values(enc), &golden("encoder_out")) < 1e-4, "encoder on all patches");
        let out = model.forward_parts(img, idx("visible"), idx("masked")).unwrap();
        assert!(max_diff(&values(out.latent_target), &golden("latent_target")) < 1e-4, "teacher");
        assert!(max_diff(&values(out.latent_pred), &golden("latent_pred")) < 1e-4, "regressor");
        assert!(max_diff(&values(out.prediction), &golden("logits")) < 1e-3, "decoder + head");
    }

    #[test]
    fn full_checkpoint_v090_layout_reproduces_the_reference() {
        let (model, r) = import("cae_mmselfsup_micro_legacy.pth");
        assert_eq!((r.form, r.teacher, r.neck, r.split_qkv_bias), ("full", true, true, false));
        assert!(r.ignored.iter().any(|k| k.starts_with("head.encoder.")));
        check_outputs(&model);
    }

    #[test]
    fn full_checkpoint_head_layout_splits_the_qkv_bias() {
        let (model, r) = import("cae_mmselfsup_micro_qkvbias_legacy.pth");
        assert!(r.split_qkv_bias);
        check_outputs(&model);
    }

    #[test]
    fn extracted_backbone_gives_the_encoder_and_a_teacher_copy() {
        let (model, r) = import("cae_mmselfsup_micro_backbone_legacy.pth");
        assert_eq!((r.form, r.teacher, r.neck), ("backbone", false, false));
        let device = Default::default();
        let img = Tensor::<B, 4>::from_data(TensorData::new(golden("input"), [1, 3, 64, 64]), &device);
        let all = Tensor::<B, 1, Int>::arange(0..16, &device).unsqueeze::<2>();
        let enc = model.encoder.forward(img.clone(), all.clone());
        assert!(max_diff(&values(enc.clone()), &golden("encoder_out")) < 1e-4);
        assert_eq!(values(model.teacher.forward(img, all)), values(enc), "teacher = encoder copy");
        assert_eq!(
            probe_mmselfsup(Path::new(&format!("{DIR}/cae_mmselfsup_micro_backbone_legacy.pth"))).unwrap(),
            (64, 2)
        );
    }

    #[test]
    fn a_file_for_another_model_is_refused_with_its_name() {
        let device = Default::default();
        let mut cfg = CaeConfig::micro();
        cfg.depth = 3;
        let model = Cae::<B>::new(&cfg, &device).unwrap();
        let p = format!("{DIR}/cae_mmselfsup_micro_legacy.pth");
        let e = load_mmselfsup(model, Path::new(&p)).expect_err("depth 3 must not load a depth-2 file");
        let msg = e.to_string();
        assert!(msg.contains("cae_mmselfsup_micro_legacy.pth") && msg.contains("encoder.layers.2"), "{msg}");
        // A DALL-E file is not a CAE checkpoint.
        let model = Cae::<B>::new(&CaeConfig::micro(), &device).unwrap();
        let dalle = format!("{DIR}/dalle_micro.pth");
        assert!(load_mmselfsup(model, Path::new(&dalle)).is_err());
    }
}
