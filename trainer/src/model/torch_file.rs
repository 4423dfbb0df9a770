//! Checks on a `torch.save` file before any parser reads it.
//!
//! The zip container (PyTorch >= 1.6) declares each entry's compressed and uncompressed size in
//! its central directory; burn-store allocates an entry's declared size and inflates it whole.
//! An entry that would inflate past a bound derived from the expected model (or a stored entry
//! larger than the file) is refused here, naming it, before anything is allocated. (Legacy,
//! non-zip files hold raw storages after the pickle and cannot inflate.)

use std::fs::File;
use std::path::Path;

use crate::CaeError;

/// The most an mmselfsup CAE checkpoint may hold: ViT-B encoder, teacher, regressor and
/// decoder with AdamW moments in f32 come to ~2.5 GB.
pub const MMSELFSUP_BOUND: u64 = 4 << 30;
/// The most a DALL-E encoder file may hold (54M parameters: 215 MB in f32).
pub const DALLE_BOUND: u64 = 1 << 30;

/// Refuses a zip `torch.save` file whose entries declare more than `bound` bytes in total, or
/// a stored entry larger than the file. Non-zip (legacy) files pass.
pub fn check(path: &Path, bound: u64) -> Result<(), CaeError> {
    let err = |reason: String| CaeError::Weights { path: path.display().to_string(), reason };
    let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let len = file.metadata().map_err(|e| err(format!("cannot stat: {e}")))?.len();
    let Ok(mut zip) = zip::ZipArchive::new(file) else { return Ok(()) }; // legacy format
    let mut total = 0u64;
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| err(format!("zip entry {i}: {e}")))?;
        let (name, size) = (entry.name().to_string(), entry.size());
        if entry.compression() == zip::CompressionMethod::Stored && size > len {
            return Err(err(format!("entry {name} declares {size} bytes, more than the file's {len}")));
        }
        total = total.saturating_add(size);
        if total > bound {
            return Err(err(format!(
                "entry {name} (declared {size} bytes) takes the contents past {bound} bytes, more than the model can \
                 hold: refused before inflating"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A zip whose one entry inflates to 64 MiB from a few KiB is refused under a 16 MiB bound,
    /// naming the entry; the same file passes a larger bound; a legacy file passes.
    #[test]
    fn inflating_entries_are_refused_before_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bomb.pth");
        let mut w = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        w.start_file("archive/data/0", opts).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            w.write_all(&zeros).unwrap();
        }
        w.finish().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20, "it compresses");
        let e = check(&path, 16 << 20).unwrap_err().to_string();
        assert!(e.contains("archive/data/0") && e.contains("refused before inflating"), "{e}");
        check(&path, 128 << 20).unwrap();
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/cae_mmselfsup_micro_legacy.pth");
        check(&golden, 1 << 20).unwrap();
    }
}
