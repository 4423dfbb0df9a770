//! `trainer tokens`: DALL-E token ids of image files, as JSON (spec §3).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::DALLE_CHECKPOINT;

#[derive(Args, Debug)]
pub struct TokensArgs {
    /// DALL-E encoder weights (.pth state_dict or .safetensors).
    #[arg(long, default_value = DALLE_CHECKPOINT)]
    pub tokenizer: PathBuf,
    /// Tokenizer size: `openai` (n_hid 256, vocab 8192) or `micro` (n_hid 64, vocab 512).
    #[arg(long, default_value = "openai")]
    pub tokenizer_size: String,
    /// Side of the view the tokens are computed from (112 for ViT-B/16 at 224 px).
    #[arg(long, default_value_t = 112)]
    pub size: usize,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub(super) fn tokens_command(a: &TokensArgs) -> anyhow::Result<()> {
    type B = burn::backend::Flex;
    let device = Default::default();
    let size_cfg = match a.tokenizer_size.as_str() {
        "openai" => crate::model::DalleConfig::openai(),
        "micro" => crate::model::DalleConfig::micro(),
        other => bail!("--tokenizer-size {other:?}: expected openai or micro"),
    };
    if a.size == 0 || !a.size.is_multiple_of(8) {
        bail!("--size {} must be a positive multiple of 8", a.size);
    }
    let enc = crate::weights::load_dalle(size_cfg.init::<B>(&device), &a.tokenizer)?;
    let grid = a.size / 8;
    let mut out = Vec::new();
    for path in &a.images {
        let img = crate::tokens::read_image(path)?;
        let ids = crate::tokens::image_tokens(&enc, &img, a.size, &device)?;
        let rows: Vec<Vec<i64>> = ids.chunks(grid).map(|r| r.to_vec()).collect();
        out.push(serde_json::json!({ "path": path.display().to_string(), "width": img.width, "height": img.height, "tokens": rows }));
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
