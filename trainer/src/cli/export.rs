//! `trainer export`: the pre-trained encoder as safetensors with timm or mmselfsup names.

use std::path::PathBuf;

use clap::Args;

use crate::weights::{self, WeightsFile};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint file, a run directory (its latest checkpoint), or an mmselfsup CAE
    /// checkpoint (.pth) to convert.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Key names: timm (`vit_base_patch16_224` layout) or mmselfsup (MS0 `backbone.*`).
    #[arg(long, value_enum)]
    pub format: crate::export::ExportFormat,
    /// Output file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

pub(super) fn export_command(a: &ExportArgs) -> anyhow::Result<()> {
    crate::run_dir::check_file_writable(&a.out)?;
    let file = WeightsFile::locate(&a.checkpoint)?;
    let loaded = weights::load::<burn::backend::Flex>(&file, &Default::default())?;
    let (ckpt, model, config, step) = (file.path(), loaded.model, loaded.config, loaded.step.unwrap_or(0));
    let tensors = crate::export::encoder_tensors(&model.encoder, a.format)?;
    let params: usize = tensors.iter().map(|t| t.data.len()).sum();
    let meta = [
        ("format", "pt".to_string()),
        ("source", ckpt.display().to_string()),
        ("step", step.to_string()),
        ("preset", format!("{:?}", config.preset).to_lowercase()),
        ("layout", format!("{:?}", a.format).to_lowercase()),
    ];
    crate::export::write_safetensors(&a.out, &tensors, &meta)?;
    println!(
        "exported the encoder of {} (step {step}): {} tensors, {params} values -> {}",
        ckpt.display(),
        tensors.len(),
        a.out.display()
    );
    Ok(())
}
