//! DALL-E dVAE encoder, the frozen tokenizer (spec §3; DALLE `dall_e/encoder.py`).

use burn::module::{Initializer, Module};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::{Int, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::CaeError;
use crate::amp::{conv2d, to_f32};

/// Shape of the DALL-E encoder (spec §3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DalleConfig {
    /// Base width: group g has n_hid·2^(g-1) output channels (256 in OpenAI's model).
    pub n_hid: usize,
    /// Output channels = token vocabulary (8192).
    pub vocab_size: usize,
    /// Input channels (3).
    pub input_channels: usize,
    /// Number of groups (4; three of them end with a 2x max-pool).
    pub group_count: usize,
    /// Blocks per group (2).
    pub n_blk_per_group: usize,
}

impl DalleConfig {
    /// OpenAI's released encoder: n_hid 256, vocab 8192 (53,786,240 parameters).
    pub fn openai() -> Self {
        Self { n_hid: 256, vocab_size: 8192, input_channels: 3, group_count: 4, n_blk_per_group: 2 }
    }

    /// The smallest encoder its validators allow (spec §7 B): n_hid 64, vocab 512.
    pub fn micro() -> Self {
        Self { n_hid: 64, vocab_size: 512, ..Self::openai() }
    }

    /// DALL-E's own validators (`dall_e/encoder.py`), plus the 4-group layout we implement.
    pub fn validate(&self) -> Result<(), CaeError> {
        if self.group_count != 4 || self.n_blk_per_group < 1 || self.input_channels < 1 {
            return Err(CaeError::Config(format!(
                "tokenizer: need group_count 4, n_blk_per_group >= 1, input_channels >= 1, got {self:?}"
            )));
        }
        if self.n_hid < 64 || self.vocab_size < 512 {
            return Err(CaeError::Config(format!("tokenizer: need n_hid >= 64 and vocab >= 512, got {self:?}")));
        }
        if !self.n_hid.is_multiple_of(4) {
            return Err(CaeError::Config(format!("tokenizer: n_hid {} must be a multiple of 4", self.n_hid)));
        }
        Ok(())
    }

    /// A frozen encoder with DALL-E's own random init: w ~ N(0, 1/(n_in·k²)), b = 0; every
    /// parameter has `require_grad = false` (lazily, nothing is allocated before first use).
    /// Real weights are loaded over it (call `.no_grad()` after loading a record).
    /// The config is assumed validated.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DalleEncoder<B> {
        let n_layers = self.group_count * self.n_blk_per_group;
        let post_gain = 1.0 / (n_layers * n_layers) as f64;
        let widths = [self.n_hid, self.n_hid, 2 * self.n_hid, 4 * self.n_hid, 8 * self.n_hid];
        let groups = (0..self.group_count)
            .map(|g| {
                let blocks = (0..self.n_blk_per_group)
                    .map(|k| {
                        let n_in = if k == 0 { widths[g] } else { widths[g + 1] };
                        DalleBlock::new(n_in, widths[g + 1], post_gain, device)
                    })
                    .collect();
                DalleGroup { blocks, pool: g + 1 < self.group_count }
            })
            .collect();
        DalleEncoder {
            input: dalle_conv(self.input_channels, self.n_hid, 7, device),
            groups,
            output: dalle_conv(widths[self.group_count], self.vocab_size, 1, device),
        }
    }
}

/// DALL-E `Conv2d`: stride 1, padding (k-1)/2, w ~ N(0, 1/(n_in·k²)), b = 0.
fn dalle_conv<B: Backend>(n_in: usize, n_out: usize, k: usize, device: &B::Device) -> Conv2d<B> {
    let p = (k - 1) / 2;
    let mut conv =
        Conv2dConfig::new([n_in, n_out], [k, k]).with_padding(PaddingConfig2d::Explicit(p, p, p, p)).init(device);
    let std = 1.0 / ((n_in * k * k) as f64).sqrt();
    let shape = [n_out, n_in, k, k];
    conv.weight = super::init::normal(shape, std, device, false);
    conv.bias = Some(Initializer::Zeros.init([n_out], device).set_require_grad(false));
    conv
}

/// `out = id(x) + post_gain·res(x)`; res = (ReLU, conv3x3) x3 -> ReLU -> conv1x1, hidden n_out/4.
#[derive(Module, Debug)]
pub struct DalleBlock<B: Backend> {
    /// 1x1 conv when n_in != n_out, otherwise identity.
    pub id_path: Option<Conv2d<B>>,
    /// 3x3, n_in -> n_out/4.
    pub conv_1: Conv2d<B>,
    /// 3x3, hidden -> hidden.
    pub conv_2: Conv2d<B>,
    /// 3x3, hidden -> hidden.
    pub conv_3: Conv2d<B>,
    /// 1x1, hidden -> n_out.
    pub conv_4: Conv2d<B>,
    /// 1 / n_layers² (1/64).
    pub post_gain: f64,
}

impl<B: Backend> DalleBlock<B> {
    /// A block with DALL-E's random init (hidden width n_out/4).
    pub fn new(n_in: usize, n_out: usize, post_gain: f64, device: &B::Device) -> Self {
        let h = n_out / 4;
        Self {
            id_path: (n_in != n_out).then(|| dalle_conv(n_in, n_out, 1, device)),
            conv_1: dalle_conv(n_in, h, 3, device),
            conv_2: dalle_conv(h, h, 3, device),
            conv_3: dalle_conv(h, h, 3, device),
            conv_4: dalle_conv(h, n_out, 1, device),
            post_gain,
        }
    }

    /// `[b, n_in, s, s]` -> `[b, n_out, s, s]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let id = match &self.id_path {
            Some(conv) => conv2d(conv, x.clone()), // [b, n_out, s, s]
            None => x.clone(),
        };
        let r = conv2d(&self.conv_1, relu(x)); // [b, h, s, s]
        let r = conv2d(&self.conv_2, relu(r)); // [b, h, s, s]
        let r = conv2d(&self.conv_3, relu(r)); // [b, h, s, s]
        let r = conv2d(&self.conv_4, relu(r)); // [b, n_out, s, s]
        id + r * self.post_gain // [b, n_out, s, s]
    }
}

/// A group of blocks, followed by a 2x2 max-pool except in the last group.
#[derive(Module, Debug)]
pub struct DalleGroup<B: Backend> {
    /// The blocks.
    pub blocks: Vec<DalleBlock<B>>,
    /// Whether a 2x2/2 max-pool follows.
    pub pool: bool,
}

/// The frozen DALL-E encoder (parameters never require grad).
#[derive(Module, Debug)]
pub struct DalleEncoder<B: Backend> {
    /// 7x7 input conv, 3 -> n_hid.
    pub input: Conv2d<B>,
    /// The four groups.
    pub groups: Vec<DalleGroup<B>>,
    /// ReLU then 1x1 conv to the vocabulary.
    pub output: Conv2d<B>,
}

impl<B: Backend> DalleEncoder<B> {
    /// Logits over the vocabulary per 8x8 cell (f32). Under [`crate::amp::autocast`] the
    /// convolutions and the activations between them are in the half type.
    ///
    /// # Shapes
    /// - x: `[b, 3, s, s]` (view 2 after `map_pixels`, values in [0.1, 0.9]) -> `[b, vocab, s/8, s/8]`
    pub fn logits(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = conv2d(&self.input, x.detach()); // [b, n_hid, s, s]
        for group in &self.groups {
            for block in &group.blocks {
                x = block.forward(x); // [b, c_g, s_g, s_g]
            }
            if group.pool {
                x = max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false); // [b, c_g, s_g/2, s_g/2]
            }
        }
        to_f32(conv2d(&self.output, relu(x))).detach() // [b, vocab, s/8, s/8]
    }

    /// Token ids = argmax over channels (the first maximum on ties), raster order.
    ///
    /// # Shapes
    /// - x: `[b, 3, s, s]` -> `[b, (s/8)²]`
    pub fn tokens(&self, x: Tensor<B, 4>) -> Tensor<B, 2, Int> {
        let logits = self.logits(x); // [b, vocab, g, g]
        let [b, _, gh, gw] = logits.dims();
        logits.argmax(1).reshape([b, gh * gw]) // [b, g²]
    }
}

/// DALL-E `map_pixels`: x ↦ 0.8·x + 0.1 for x in [0, 1] (spec §1 step 6).
pub fn map_pixels<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x * 0.8 + 0.1
}
