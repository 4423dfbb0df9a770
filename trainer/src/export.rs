//! `trainer export`: the pre-trained encoder as safetensors, with timm or mmselfsup key names
//! (spec §5). Only the encoder is exported (teacher, neck and tokenizer are dropped, as MS0's
//! `extract_backbone_weights.py` does).
//!
//! - `timm` (`vit_base_patch16_224` layout): `patch_embed.proj.*`, `cls_token`, `pos_embed`
//!   `[1, 1+N, D]`, `blocks.i.norm1/norm2`, `blocks.i.attn.qkv.weight`, `blocks.i.attn.qkv.bias` =
//!   concat(q_bias, 0, v_bias) (the q/v biases are kept, spec §5), `blocks.i.attn.proj.*`,
//!   `blocks.i.ls1.gamma` / `ls2.gamma` (load with `init_values` set), `blocks.i.mlp.fc1/fc2`,
//!   `norm.*` (the final LN).
//! - `mmselfsup` (MS0 checkpoint names, spec §5): `backbone.patch_embed.projection.*`,
//!   `backbone.layers.i.{ln1, ln2, gamma_1, gamma_2}`, `backbone.layers.i.attn.{qkv.weight,
//!   q_bias, v_bias, proj}`, `backbone.layers.i.ffn.layers.0.0` / `ffn.layers.1`, `backbone.ln1`.
//!
//! Linear weights are written in torch's `[out, in]` layout (burn stores `[in, out]`).
//! Files are written with the `safetensors` crate, atomically (temp + fsync + rename).

use std::fs;
use std::path::Path;

use burn::nn::{LayerNorm, Linear};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::CaeError;
use crate::model::Encoder;

/// Key layout of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Timm,
    Mmselfsup,
}

/// One exported tensor, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, CaeError> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| CaeError::Data(format!("reading a tensor: {e:?}")))
}

fn push<B: Backend, const D: usize>(out: &mut Vec<NamedTensor>, name: String, t: Tensor<B, D>) -> Result<(), CaeError> {
    let shape = t.dims().to_vec();
    out.push(NamedTensor { name, shape, data: values(t)? });
    Ok(())
}

/// Linear weight `[out, in]` and bias.
fn linear<B: Backend>(out: &mut Vec<NamedTensor>, prefix: &str, l: &Linear<B>) -> Result<(), CaeError> {
    push(out, format!("{prefix}.weight"), l.weight.val().transpose())?;
    if let Some(b) = &l.bias {
        push(out, format!("{prefix}.bias"), b.val())?;
    }
    Ok(())
}

fn layer_norm<B: Backend>(out: &mut Vec<NamedTensor>, prefix: &str, n: &LayerNorm<B>) -> Result<(), CaeError> {
    push(out, format!("{prefix}.weight"), n.gamma.val())?;
    if let Some(b) = &n.beta {
        push(out, format!("{prefix}.bias"), b.val())?;
    }
    Ok(())
}

/// The encoder's tensors under the names of `format`.
pub fn encoder_tensors<B: Backend>(enc: &Encoder<B>, format: ExportFormat) -> Result<Vec<NamedTensor>, CaeError> {
    let mut out = Vec::new();
    let timm = format == ExportFormat::Timm;
    let p = if timm { String::new() } else { "backbone.".to_string() };
    let conv = &enc.patch_embed.projection;
    let patch = if timm { "patch_embed.proj" } else { "patch_embed.projection" };
    push(&mut out, format!("{p}{patch}.weight"), conv.weight.val())?;
    if let Some(b) = &conv.bias {
        push(&mut out, format!("{p}{patch}.bias"), b.val())?;
    }
    push(&mut out, format!("{p}cls_token"), enc.cls_token.val())?;
    push(&mut out, format!("{p}pos_embed"), enc.pos_embed.clone().unsqueeze::<3>())?; // [1, 1+N, D]
    for (i, blk) in enc.layers.iter().enumerate() {
        let a = &blk.attn;
        if timm {
            let b = format!("blocks.{i}");
            layer_norm(&mut out, &format!("{b}.norm1"), &blk.ln1)?;
            push(&mut out, format!("{b}.attn.qkv.weight"), a.qkv.weight.val().transpose())?;
            let q = a.q_bias.val();
            let k = q.zeros_like();
            push(&mut out, format!("{b}.attn.qkv.bias"), Tensor::cat(vec![q, k, a.v_bias.val()], 0))?;
            linear(&mut out, &format!("{b}.attn.proj"), &a.proj)?;
            push(&mut out, format!("{b}.ls1.gamma"), blk.gamma_1.val())?;
            layer_norm(&mut out, &format!("{b}.norm2"), &blk.ln2)?;
            linear(&mut out, &format!("{b}.mlp.fc1"), &blk.ffn.fc1)?;
            linear(&mut out, &format!("{b}.mlp.fc2"), &blk.ffn.fc2)?;
            push(&mut out, format!("{b}.ls2.gamma"), blk.gamma_2.val())?;
        } else {
            let b = format!("backbone.layers.{i}");
            layer_norm(&mut out, &format!("{b}.ln1"), &blk.ln1)?;
            push(&mut out, format!("{b}.attn.qkv.weight"), a.qkv.weight.val().transpose())?;
            push(&mut out, format!("{b}.attn.q_bias"), a.q_bias.val())?;
            push(&mut out, format!("{b}.attn.v_bias"), a.v_bias.val())?;
            linear(&mut out, &format!("{b}.attn.proj"), &a.proj)?;
            push(&mut out, format!("{b}.gamma_1"), blk.gamma_1.val())?;
            layer_norm(&mut out, &format!("{b}.ln2"), &blk.ln2)?;
            linear(&mut out, &format!("{b}.ffn.layers.0.0"), &blk.ffn.fc1)?;
            linear(&mut out, &format!("{b}.ffn.layers.1"), &blk.ffn.fc2)?;
            push(&mut out, format!("{b}.gamma_2"), blk.gamma_2.val())?;
        }
    }
    layer_norm(&mut out, if timm { "norm" } else { "backbone.ln1" }, &enc.ln1)?;
    Ok(out)
}

/// A tensor of any dtype for [`write_tensors`]: little-endian element bytes, row-major.
pub struct RawTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    pub fn f32(name: &str, shape: Vec<usize>, data: &[f32]) -> Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self { name: name.into(), dtype: safetensors::Dtype::F32, shape, bytes }
    }
    pub fn i64(name: &str, shape: Vec<usize>, data: &[i64]) -> Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self { name: name.into(), dtype: safetensors::Dtype::I64, shape, bytes }
    }
    pub fn u8(name: &str, shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self { name: name.into(), dtype: safetensors::Dtype::U8, shape, bytes: data }
    }
}

/// Writes tensors of any dtype as a safetensors file with string `metadata`, atomically (temp
/// file, fsync, rename).
pub fn write_tensors(path: &Path, tensors: &[RawTensor], metadata: &[(&str, String)]) -> Result<(), CaeError> {
    let views = tensors
        .iter()
        .map(|t| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| CaeError::Data(format!("tensor {}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta: std::collections::HashMap<String, String> =
        metadata.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| CaeError::Io { path: tmp.clone(), source: std::io::Error::other(e.to_string()) })?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(CaeError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(CaeError::io(path))
}

/// Writes f32 `tensors` as a safetensors file with string `metadata`, atomically.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor], metadata: &[(&str, String)]) -> Result<(), CaeError> {
    let raw: Vec<RawTensor> = tensors.iter().map(|t| RawTensor::f32(&t.name, t.shape.clone(), &t.data)).collect();
    write_tensors(path, &raw, metadata)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cae, CaeConfig};
    use burn::backend::Flex;
    use std::collections::HashMap;

    /// An independent minimal safetensors reader: name -> (shape, f32 values).
    fn read(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
        let bytes = fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut out = HashMap::new();
        for (k, v) in header.as_object().unwrap() {
            if k == "__metadata__" {
                continue;
            }
            assert_eq!(v["dtype"], "F32");
            let shape: Vec<usize> =
                v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let (a, b) =
                (v["data_offsets"][0].as_u64().unwrap() as usize, v["data_offsets"][1].as_u64().unwrap() as usize);
            let vals = data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            out.insert(k.clone(), (shape, vals));
        }
        out
    }

    fn vals<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn timm_export_has_timm_names_torch_layout_and_qv_bias() {
        let dev = Default::default();
        let model = crate::model::init::with_seed(4, || Cae::<Flex>::new(&CaeConfig::micro(), &dev)).unwrap();
        // Non-zero q/v biases, so the concat order is visible.
        let mut enc = model.encoder.clone();
        let d = 64;
        enc.layers[0].attn.q_bias = burn::module::Param::from_tensor(
            Tensor::<Flex, 1, burn::tensor::Int>::arange(0..d as i64, &dev).float() + 1.0,
        );
        enc.layers[0].attn.v_bias = burn::module::Param::from_tensor(
            Tensor::<Flex, 1, burn::tensor::Int>::arange(0..d as i64, &dev).float() - 100.0,
        );
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("enc.safetensors");
        let tensors = encoder_tensors(&enc, ExportFormat::Timm).unwrap();
        write_safetensors(&path, &tensors, &[("format", "pt".into())]).unwrap();
        let got = read(&path);
        // 4 (patch w/b, cls, pos) + 14 per block (norm1 w/b, qkv w/b, proj w/b, ls1, norm2 w/b,
        // fc1 w/b, fc2 w/b, ls2) + 2 (norm w/b) for depth 2.
        assert_eq!(got.len(), 4 + 14 * 2 + 2);
        assert_eq!(got["pos_embed"].0, vec![1, 17, 64]);
        assert_eq!(got["cls_token"].0, vec![1, 1, 64]);
        assert_eq!(got["patch_embed.proj.weight"].0, vec![64, 3, 16, 16]);
        assert_eq!(got["blocks.1.mlp.fc1.weight"].0, vec![256, 64], "torch layout [out, in]");
        assert!(got.contains_key("norm.weight") && got.contains_key("blocks.0.ls2.gamma"));
        // qkv.bias = concat(q_bias, 0, v_bias).
        let (shape, bias) = &got["blocks.0.attn.qkv.bias"];
        assert_eq!(shape, &vec![3 * d]);
        for i in 0..d {
            assert_eq!(bias[i], i as f32 + 1.0);
            assert_eq!(bias[d + i], 0.0);
            assert_eq!(bias[2 * d + i], i as f32 - 100.0);
        }
        // Transpose: exported [o][i] = burn weight [i][o].
        let w = vals(enc.layers[0].attn.qkv.weight.val()); // [64, 192] (in, out)
        let (shape, e) = &got["blocks.0.attn.qkv.weight"];
        assert_eq!(shape, &vec![3 * d, d]);
        for (o, i) in [(0, 0), (5, 7), (191, 63), (100, 3)] {
            assert_eq!(e[o * d + i], w[i * 3 * d + o]);
        }
    }

    #[test]
    fn mmselfsup_export_uses_backbone_names() {
        let dev = Default::default();
        let model = Cae::<Flex>::new(&CaeConfig::micro(), &dev).unwrap();
        let names: Vec<String> =
            encoder_tensors(&model.encoder, ExportFormat::Mmselfsup).unwrap().into_iter().map(|t| t.name).collect();
        for n in [
            "backbone.patch_embed.projection.weight",
            "backbone.cls_token",
            "backbone.pos_embed",
            "backbone.layers.0.ln1.weight",
            "backbone.layers.0.attn.qkv.weight",
            "backbone.layers.0.attn.q_bias",
            "backbone.layers.0.attn.v_bias",
            "backbone.layers.1.attn.proj.bias",
            "backbone.layers.1.gamma_1",
            "backbone.layers.1.ffn.layers.0.0.weight",
            "backbone.layers.1.ffn.layers.1.bias",
            "backbone.ln1.bias",
        ] {
            assert!(names.iter().any(|x| x == n), "missing {n}: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("qkv.bias")), "MS0 has no qkv.bias");
    }
}
