//! `trainer features`: encoder features of every sample of a shard set, for k-NN, linear probes
//! and anything else that wants frozen representations.
//!
//! Each image goes through the test transform (spec §5: resize the shorter side, centre crop to
//! the model's input size, ImageNet mean/std — [`cae_pipeline::eval`]) and the encoder with
//! nothing masked (all N patches visible, which is the plain ViT forward). Two features per
//! image, both after the encoder's final LayerNorm: `cls` (the cls token) and `mean` (the mean of
//! the N patch tokens).
//!
//! File layout (safetensors): `cls` F32 `[n, D]`, `mean` F32 `[n, D]`, `labels` I64 `[n]` (-1 for a
//! sample without `.cls`), `keys` U8 `[n, L]` (each row a UTF-8 sample key, zero-padded to the
//! longest key). In Python: `[bytes(r).rstrip(b"\0").decode() for r in f["keys"]]`.
//!
//! Every sample is read or the extraction fails, naming the shard and sample (or the failed
//! shards); with `allow_partial` the rest is read and [`ReadReport`] says what was left out.

use std::path::Path;
use std::sync::atomic::Ordering;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use cae_pipeline::eval::{EvalBatch, EvalConfig, EvalReader, EvalStats};
use cae_pipeline::source::ShardSpec;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::CaeError;
use crate::export::{RawTensor, write_tensors};
use crate::model::Encoder;
use crate::train::normalize_on_device;

/// Features of a shard set, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub dim: usize,
    /// `[n, dim]` cls token after the final norm.
    pub cls: Vec<f32>,
    /// `[n, dim]` mean of the patch tokens after the final norm.
    pub mean: Vec<f32>,
    pub labels: Vec<i64>,
    pub keys: Vec<String>,
    /// What was read of the shard set.
    pub read: ReadReport,
}

/// What a features pass read: "N of M samples", and what it left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReadReport {
    /// Samples read and used.
    pub samples: u64,
    /// Samples the shards hold by their manifests (`null` without counts).
    pub of: Option<u64>,
    /// Samples skipped as bad (corrupt image, bad class, too large).
    pub bad_samples: u64,
    /// Shards that failed (cannot open, broken tar, short against the manifest), secrets redacted.
    pub failed_shards: Vec<String>,
}

impl ReadReport {
    fn of_pass(stats: &EvalStats) -> Self {
        ReadReport {
            samples: stats.samples_done.load(Ordering::Relaxed),
            of: stats.expected_samples,
            bad_samples: stats.bad_samples.load(Ordering::Relaxed),
            failed_shards: stats.failed_shards(),
        }
    }

    /// Whether every sample of the set was read.
    pub fn complete(&self) -> bool {
        self.bad_samples == 0 && self.failed_shards.is_empty() && self.of.is_none_or(|m| m == self.samples)
    }

    /// "24 of 25 samples (1 bad sample)", "24 samples, 1 shard failed: a.tar".
    pub fn describe(&self) -> String {
        let mut s = match self.of {
            Some(m) => format!("{} of {m} samples", self.samples),
            None => format!("{} samples", self.samples),
        };
        if self.bad_samples > 0 {
            s.push_str(&format!(", {} bad samples skipped", self.bad_samples));
        }
        if !self.failed_shards.is_empty() {
            s.push_str(&format!(", {} shards failed: {}", self.failed_shards.len(), self.failed_shards.join(", ")));
        }
        s
    }
}

/// What [`extract`] reads and how.
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    /// The test transform, threads, caps and policies. Without `allow_partial` the failed-shard
    /// tolerance is 0.
    pub eval: EvalConfig,
    /// The shard source as it may be shown (secrets redacted), for messages.
    pub shown: String,
    /// Read what can be read, and report the rest ([`ReadReport`]), instead of failing at the
    /// first sample or shard that cannot be read.
    pub allow_partial: bool,
    pub progress: bool,
}

impl Features {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Writes the safetensors file described in the module docs.
    pub fn save(&self, path: &Path, metadata: &[(&str, String)]) -> Result<(), CaeError> {
        let n = self.len();
        let width = self.keys.iter().map(String::len).max().unwrap_or(0).max(1);
        let mut keys = vec![0u8; n * width];
        for (row, k) in keys.chunks_exact_mut(width).zip(&self.keys) {
            row[..k.len()].copy_from_slice(k.as_bytes());
        }
        let tensors = [
            RawTensor::f32("cls", vec![n, self.dim], &self.cls),
            RawTensor::f32("mean", vec![n, self.dim], &self.mean),
            RawTensor::i64("labels", vec![n], &self.labels),
            RawTensor::u8("keys", vec![n, width], keys),
        ];
        write_tensors(path, &tensors, metadata)
    }
}

/// The resize that goes with an input size: 256 for 224 (the ImageNet test transform), the same
/// ratio 8/7 otherwise.
pub fn default_resize(img_size: usize) -> usize {
    (img_size * 8).div_ceil(7).max(img_size)
}

/// `[b, 3, S, S]` u8 images -> normalised f32 on the device, then the encoder on all patches.
/// Returns `(cls [b, D], mean [b, D])`.
pub fn encode_batch<B: Backend>(
    encoder: &Encoder<B>,
    batch: &EvalBatch,
    device: &B::Device,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>), CaeError> {
    let (b, s) = (batch.len(), batch.size);
    let [n1, _] = encoder.pos_embed.dims();
    let n = n1 - 1;
    let images = normalize_on_device::<B>(batch.images.clone(), [b, 3, s, s], device); // [b, 3, s, s]
    let all = Tensor::<B, 1, Int>::arange(0..n as i64, device).unsqueeze::<2>().expand([b, n]); // [b, N]
    let x = encoder.forward(images, all); // [b, 1 + N, D]
    let d = x.dims()[2];
    let cls = x.clone().narrow(1, 0, 1).reshape([b, d]); // [b, D]
    let avg = x.narrow(1, 1, n).mean_dim(1).reshape([b, d]); // [b, D]
    Ok((cls, avg))
}

fn host(t: Tensor<impl Backend, 2>) -> Result<Vec<f32>, CaeError> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| CaeError::Data(format!("reading features: {e:?}")))
}

/// Features of every sample of `shards`. `cfg.eval.crop` must be the encoder's input size.
pub fn extract<B: Backend>(
    encoder: &Encoder<B>,
    shards: Vec<ShardSpec>,
    cfg: &ExtractConfig,
    device: &B::Device,
) -> Result<Features, CaeError> {
    let shown = &cfg.shown;
    let total: Option<u64> = shards.iter().map(|s| s.samples).sum();
    let mut eval = cfg.eval.clone();
    if !cfg.allow_partial {
        eval.read.max_failed_shards = Some(0);
    }
    let mut reader = EvalReader::new(eval, shards).map_err(|e| partial_hint(shown, &e.to_string()))?;
    let pb = match (cfg.progress, total) {
        (false, _) => ProgressBar::hidden(),
        (true, Some(t)) => ProgressBar::new(t),
        (true, None) => ProgressBar::no_length(),
    };
    pb.set_style(
        ProgressStyle::with_template("features {bar:30} {pos}/{len} images, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let d = encoder.cls_token.val().dims()[2];
    let mut out = Features {
        dim: d,
        cls: Vec::new(),
        mean: Vec::new(),
        labels: Vec::new(),
        keys: Vec::new(),
        read: ReadReport::default(),
    };
    while let Some(batch) = reader.next() {
        let batch = batch.map_err(|e| partial_hint(shown, &e.to_string()))?;
        if !cfg.allow_partial
            && let Some(bad) = reader.stats().first_bad_samples().first()
        {
            return Err(partial_hint(shown, &format!("{bad} (and every sample must be read)")));
        }
        let (cls, mean) = encode_batch(encoder, &batch, device)?;
        out.cls.extend(host(cls)?);
        out.mean.extend(host(mean)?);
        out.labels.extend_from_slice(&batch.labels);
        pb.inc(batch.len() as u64);
        out.keys.extend(batch.keys);
    }
    pb.finish_and_clear();
    out.read = ReadReport::of_pass(reader.stats());
    if !cfg.allow_partial
        && let Some(bad) = reader.stats().first_bad_samples().first()
    {
        return Err(partial_hint(shown, &format!("{bad} (and every sample must be read)")));
    }
    if !out.read.complete() {
        tracing::warn!("{shown}: {}", out.read.describe());
    }
    if out.is_empty() {
        return Err(CaeError::Data(format!("{shown}: no readable samples")));
    }
    Ok(out)
}

/// A read failure of `shown`, with the way to read the rest anyway.
fn partial_hint(shown: &str, what: &str) -> CaeError {
    CaeError::Data(format!(
        "{shown}: {what}; pass --allow-partial to use the samples that can be read (the result then says how many)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CaeConfig;
    use burn::backend::Flex;

    #[test]
    fn default_resize_is_256_for_224() {
        assert_eq!(default_resize(224), 256);
        assert_eq!(default_resize(64), 74);
    }

    /// The features equal a plain ViT forward written out here from the encoder's parts: cls and
    /// mean of the final-norm tokens, on the normalised image.
    #[test]
    fn features_are_the_final_norm_cls_and_patch_mean() {
        type B = Flex;
        let device = Default::default();
        let cfg = CaeConfig::micro();
        let enc = crate::model::init::with_seed(3, || Encoder::<B>::new(&cfg, &device));
        let s = cfg.img_size;
        let images: Vec<u8> = (0..2 * 3 * s * s).map(|i| ((i * 37) % 251) as u8).collect();
        let batch = EvalBatch { size: s, images, labels: vec![0, 1], keys: vec!["a".into(), "b".into()] };
        let (cls, mean) = encode_batch(&enc, &batch, &device).unwrap();

        // Reference: normalise on the host, patchify with the conv, add pos, blocks, norm.
        let x = Tensor::<B, 1>::from_floats(batch.images_f32().as_slice(), &device).reshape([2, 3, s, s]);
        let t = enc.patch_embed.forward(x); // [2, N, D]
        let [n1, d] = enc.pos_embed.dims();
        let t = t + enc.pos_embed.clone().narrow(0, 1, n1 - 1).unsqueeze::<3>();
        let mut t = Tensor::cat(vec![enc.cls_token.val().expand([2, 1, d]), t], 1);
        for l in &enc.layers {
            t = l.forward(t);
        }
        let t = enc.ln1.forward(t);
        let want_cls = t.clone().narrow(1, 0, 1).reshape([2, d]);
        let want_mean = t.narrow(1, 1, n1 - 1).mean_dim(1).reshape([2, d]);
        let close = |a: Tensor<B, 2>, b: Tensor<B, 2>| {
            let (a, b) = (host(a).unwrap(), host(b).unwrap());
            a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
        };
        assert!(close(cls, want_cls) < 1e-5);
        assert!(close(mean, want_mean) < 1e-5);
    }

    #[test]
    fn saved_file_reads_back_with_the_safetensors_crate() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Features {
            dim: 2,
            cls: vec![1.0, 2.0, 3.0, 4.0],
            mean: vec![5.0, 6.0, 7.0, 8.0],
            labels: vec![3, -1],
            keys: vec!["abc".into(), "x".into()],
            read: ReadReport::default(),
        };
        let p = tmp.path().join("f.safetensors");
        f.save(&p, &[("preset", "micro".into())]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let cls = st.tensor("cls").unwrap();
        assert_eq!(cls.shape(), &[2, 2]);
        assert_eq!(cls.data(), &[1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()[..]);
        let labels = st.tensor("labels").unwrap();
        assert_eq!(labels.dtype(), safetensors::Dtype::I64);
        assert_eq!(labels.data(), &[3i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()[..]);
        let keys = st.tensor("keys").unwrap();
        assert_eq!(keys.shape(), &[2, 3]);
        assert_eq!(keys.data(), b"abcx\0\0");
    }
}
