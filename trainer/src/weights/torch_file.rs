//! Checks on a `torch.save` file before any parser reads it.
//!
//! - The zip container (PyTorch >= 1.6) declares each entry's compressed and uncompressed size
//!   in its central directory; burn-store allocates an entry's declared size and inflates it
//!   whole. An entry that would inflate past a bound derived from the expected model (or a
//!   stored entry larger than the file) is refused here, naming it, before anything is
//!   allocated. (Legacy, non-zip files hold raw storages after the pickle and cannot inflate.)
//! - burn-store zero-fills a storage that is shorter than its tensors need, or missing. So the
//!   pickle is walked first ([`super::torch_pickle`]): every storage must be in the file with
//!   the bytes its declaration needs, and every tensor must fit in its storage, or the load
//!   fails naming the tensor.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::torch_pickle::{Built, Declared, Reader};
use crate::CaeError;

/// The legacy format's magic number (`torch.serialization.MAGIC_NUMBER`), little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The most an mmselfsup CAE checkpoint may hold: ViT-B encoder, teacher, regressor and
/// decoder with AdamW moments in f32 come to ~2.5 GB.
pub const MMSELFSUP_BOUND: u64 = 4 << 30;
/// The most a DALL-E encoder file may hold (54M parameters: 215 MB in f32).
pub const DALLE_BOUND: u64 = 1 << 30;

/// Refuses a `torch.save` file whose zip entries declare more than `bound` bytes in total (or a
/// stored entry larger than the file), or whose tensors are not all backed by the bytes they
/// need (zip or legacy format).
pub fn check(path: &Path, bound: u64) -> Result<(), CaeError> {
    let err = |reason: String| CaeError::Weights { path: path.display().to_string(), reason };
    let mut file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let len = file.metadata().map_err(|e| err(format!("cannot stat: {e}")))?.len();
    let mut head = [0u8; 4];
    let is_zip = file.read_exact(&mut head).is_ok() && head == *b"PK\x03\x04";
    file.rewind().map_err(|e| err(format!("cannot read: {e}")))?;
    if !is_zip {
        return check_legacy(file, len).map_err(err);
    }
    let mut zip = zip::ZipArchive::new(file).map_err(|e| err(format!("zip container unreadable (cut short?): {e}")))?;
    check_zip_sizes(&mut zip, len, bound).map_err(err)?;
    check_zip_storages(&mut zip).map_err(err)
}

/// The entries' declared sizes against the file and the bound.
fn check_zip_sizes(zip: &mut zip::ZipArchive<File>, len: u64, bound: u64) -> Result<(), String> {
    let mut total = 0u64;
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| format!("zip entry {i}: {e}"))?;
        let (name, size) = (entry.name().to_string(), entry.size());
        if entry.compression() == zip::CompressionMethod::Stored && size > len {
            return Err(format!("entry {name} declares {size} bytes, more than the file's {len}"));
        }
        total = total.saturating_add(size);
        if total > bound {
            return Err(format!(
                "entry {name} (declared {size} bytes) takes the contents past {bound} bytes, more than the model can \
                 hold: refused before inflating"
            ));
        }
    }
    Ok(())
}

/// Every storage `data.pkl` declares is an entry `<archive>/data/<key>` of exactly its bytes,
/// and every tensor fits in its storage.
fn check_zip_storages(zip: &mut zip::ZipArchive<File>) -> Result<(), String> {
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .map(str::to_string)
        .ok_or("no data.pkl in the zip container: not a torch.save file")?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut reader = Reader::new();
    {
        let entry = zip.by_name(&pkl).map_err(|e| format!("{pkl}: {e}"))?;
        reader.next(&mut BufReader::new(entry)).map_err(|e| format!("{pkl}: {e}"))?;
    }
    let declared = reader.finish();
    let mut held = Vec::with_capacity(declared.storages.len());
    for (i, s) in declared.storages.iter().enumerate() {
        let name = format!("{prefix}data/{}", s.key);
        let size = match zip.by_name(&name) {
            Ok(entry) => entry.size(),
            Err(_) => return Err(format!("tensor {}: its storage {name} is not in the file", declared.users(i))),
        };
        if let Some(n) = s.numel
            && size != n.saturating_mul(s.elem_bytes)
        {
            return Err(format!(
                "tensor {}: storage {name} holds {size} bytes, its declaration needs {} ({n} x {} {} bytes)",
                declared.users(i),
                n.saturating_mul(s.elem_bytes),
                s.elem_bytes,
                s.kind
            ));
        }
        held.push(size / s.elem_bytes);
    }
    check_extents(&declared, &held)
}

/// The legacy layout: magic number, protocol version and system info pickles, the object
/// pickle, the list of storage keys, then per storage its element count (u64) and raw bytes.
fn check_legacy(file: File, len: u64) -> Result<(), String> {
    let mut r = BufReader::new(file);
    let mut reader = Reader::new();
    let what = "not a torch.save file (neither zip nor legacy format)";
    match reader.next(&mut r) {
        Ok(Built::Long(magic)) if magic == LEGACY_MAGIC => {}
        _ => {
            // A TAR archive (torch < 0.4) is left to burn-store, which reads it whole.
            let mut tar = [0u8; 5];
            let is_tar = r.seek(SeekFrom::Start(257)).is_ok() && r.read_exact(&mut tar).is_ok() && &tar == b"ustar";
            return if is_tar { Ok(()) } else { Err(what.into()) };
        }
    }
    let step = |reader: &mut Reader, r: &mut BufReader<File>, part: &str| {
        reader.next(r).map_err(|e| format!("legacy {part}: {e}"))
    };
    step(&mut reader, &mut r, "protocol version")?;
    step(&mut reader, &mut r, "system info")?;
    step(&mut reader, &mut r, "object pickle")?;
    let Built::Keys(keys) = step(&mut reader, &mut r, "storage key list")? else {
        return Err("legacy storage key list is not a list of keys".into());
    };
    let declared = reader.finish();
    let index: std::collections::HashMap<&str, usize> =
        declared.storages.iter().enumerate().map(|(i, s)| (s.key.as_str(), i)).collect();
    let mut held = vec![None; declared.storages.len()];
    for key in &keys {
        let Some(&i) = index.get(key.as_str()) else { return Err(format!("legacy storage {key} is not declared")) };
        let s = &declared.storages[i];
        let mut count = [0u8; 8];
        r.read_exact(&mut count)
            .map_err(|_| format!("tensor {}: the file ends before storage {key}", declared.users(i)))?;
        let n = u64::from_le_bytes(count);
        if s.numel.is_some_and(|d| d != n) {
            return Err(format!(
                "tensor {}: storage {key} holds {n} elements, its declaration says {}",
                declared.users(i),
                s.numel.unwrap_or(0)
            ));
        }
        let bytes = n.saturating_mul(s.elem_bytes);
        let at = r.stream_position().map_err(|e| e.to_string())?;
        if at.saturating_add(bytes) > len {
            return Err(format!(
                "tensor {}: storage {key} needs {bytes} bytes, the file ends {} bytes after its start",
                declared.users(i),
                len - at
            ));
        }
        r.seek_relative(bytes as i64).map_err(|e| e.to_string())?;
        held[i] = Some(n);
    }
    let held: Vec<u64> = held
        .iter()
        .enumerate()
        .map(|(i, h)| {
            h.ok_or_else(|| {
                format!("tensor {}: storage {} has no data in the file", declared.users(i), declared.storages[i].key)
            })
        })
        .collect::<Result<_, _>>()?;
    check_extents(&declared, &held)
}

/// Every tensor's view fits in the elements its storage holds.
fn check_extents(declared: &Declared, held: &[u64]) -> Result<(), String> {
    for t in &declared.tensors {
        let s = &declared.storages[t.storage];
        if t.extent > held[t.storage] {
            return Err(format!(
                "tensor {} needs {} elements of storage {}, which holds {}",
                t.name, t.extent, s.key, held[t.storage]
            ));
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
        let e = check(&path, 128 << 20).unwrap_err().to_string();
        assert!(e.contains("no data.pkl"), "under the bound, the next check runs: {e}");
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/cae_mmselfsup_micro_legacy.pth");
        check(&golden, 1 << 20).unwrap();
    }

    const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

    /// A copy of `dalle_micro.pth` with entry `data/<victim>` cut to `keep` bytes, or left out.
    fn zip_variant(out: &Path, victim: &str, keep: Option<usize>) {
        let mut src = zip::ZipArchive::new(File::open(format!("{GOLDEN}/dalle_micro.pth")).unwrap()).unwrap();
        let mut w = zip::ZipWriter::new(File::create(out).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for i in 0..src.len() {
            let mut e = src.by_index(i).unwrap();
            let name = e.name().to_string();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).unwrap();
            if name == format!("dalle_micro/data/{victim}") {
                match keep {
                    None => continue,
                    Some(n) => bytes.truncate(n),
                }
            }
            w.start_file(name, opts).unwrap();
            w.write_all(&bytes).unwrap();
        }
        w.finish().unwrap();
    }

    /// The tensor names the audit gives, from an independent reading: the keys burn-store lists.
    fn has_tensor_name(msg: &str) -> bool {
        let reader = burn_store::pytorch::PytorchReader::new(format!("{GOLDEN}/dalle_micro.pth")).unwrap();
        reader.keys().iter().any(|k| msg.contains(k.as_str()))
    }

    #[test]
    fn the_golden_files_pass_the_audit() {
        for f in std::fs::read_dir(GOLDEN).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "pth") {
                check(&p, MMSELFSUP_BOUND).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }

    /// A zip `.pth` with one storage entry cut, or missing, fails naming the tensor that uses
    /// it; burn-store alone would load zeros (checked, so the test shows what the audit adds).
    #[test]
    fn cut_or_missing_zip_storages_name_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let cut = tmp.path().join("cut.pth");
        zip_variant(&cut, "2", Some(1000));
        let store = burn_store::pytorch::PytorchReader::new(&cut).unwrap();
        assert!(!store.keys().is_empty(), "burn-store reads the cut file without complaint");
        let e = check(&cut, DALLE_BOUND).unwrap_err().to_string();
        assert!(e.contains("dalle_micro/data/2") && e.contains("holds 1000 bytes") && has_tensor_name(&e), "{e}");

        let missing = tmp.path().join("missing.pth");
        zip_variant(&missing, "3", None);
        let e = check(&missing, DALLE_BOUND).unwrap_err().to_string();
        assert!(e.contains("is not in the file") && has_tensor_name(&e), "{e}");

        // The whole file cut: the zip directory is gone.
        let bytes = std::fs::read(format!("{GOLDEN}/dalle_micro.pth")).unwrap();
        let half = tmp.path().join("half.pth");
        std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
        let e = check(&half, DALLE_BOUND).unwrap_err().to_string();
        assert!(e.contains("zip container unreadable"), "{e}");
    }

    /// A legacy `.pth` cut anywhere past its pickles fails naming a tensor of the storage the
    /// cut falls in; cut inside the pickle it fails as a cut pickle.
    #[test]
    fn cut_legacy_files_name_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(format!("{GOLDEN}/cae_mmselfsup_micro_backbone_legacy.pth")).unwrap();
        let names =
            burn_store::pytorch::PytorchReader::new(format!("{GOLDEN}/cae_mmselfsup_micro_backbone_legacy.pth"))
                .unwrap()
                .keys();
        for cut in [bytes.len() - 1, bytes.len() - 5000, bytes.len() / 2] {
            let p = tmp.path().join(format!("cut{cut}.pth"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = check(&p, MMSELFSUP_BOUND).unwrap_err().to_string();
            assert!(names.iter().any(|k| e.contains(k.as_str())), "cut at {cut}: {e}");
        }
        let p = tmp.path().join("pickle_cut.pth");
        std::fs::write(&p, &bytes[..200]).unwrap();
        let e = check(&p, MMSELFSUP_BOUND).unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
    }

    /// A view reaching past its storage (8 elements of a 6-element storage) fails naming it.
    #[test]
    fn a_view_past_its_storage_names_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("view.pth");
        let mut w = zip::ZipWriter::new(File::create(&p).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        w.start_file("view/data.pkl", opts).unwrap();
        w.write_all(&crate::weights::torch_pickle::tests::state_dict()).unwrap();
        w.start_file("view/data/0", opts).unwrap();
        w.write_all(&[0u8; 24]).unwrap();
        w.finish().unwrap();
        let e = check(&p, DALLE_BOUND).unwrap_err().to_string();
        assert!(e.contains("tensor w needs 8 elements of storage 0, which holds 6"), "{e}");
    }
}
