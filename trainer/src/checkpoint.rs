//! Checkpoint files: one file per checkpoint, written atomically, the last K kept.
//!
//! Layout of `<run>/checkpoints/step-00000100.ckpt`:
//!
//! ```text
//! b"CAECKPT2"  u64 LE: length of the JSON header  u32 LE: CRC-32 of the JSON header
//! JSON header  section bytes, back to back
//! ```
//!
//! The JSON header ([`CheckpointHeader`]) holds the step, the pipeline's resume state, the
//! resolved run config (TOML text), the byte length of every section and its CRC-32. Reading
//! checks every CRC, so a corrupt file is refused, naming the header or the section, instead of
//! resuming from wrong state or decoding garbage. Files of the first layout (`CAECKPT1`: no
//! header CRC, no section CRCs) are still read, without those checks. Sections are burn
//! records in named MessagePack at full precision (f32 stays f32, so a resumed CPU run is bit
//! for bit the uninterrupted one): `model` (encoder, teacher, regressor, decoder),
//! `optimizer` (AdamW moments and step counts of both weight-decay groups) and, for a random
//! DALL-E tokenizer, `tokenizer`. There is no other RNG state: the model draws random numbers
//! only at init (and for drop path, which is 0 in every preset), and the data pipeline derives
//! every random choice from (seed, epoch, shard, index).
//!
//! Writing: `step-N.ckpt.tmp` is written and fsynced, renamed over `step-N.ckpt`, then the
//! directory is fsynced; a crash at any point leaves either the old set of checkpoints or the
//! new one. Older checkpoints beyond `keep_last` are deleted afterwards.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder};
use burn::tensor::backend::Backend;
use cae_pipeline::LoaderState;
use serde::{Deserialize, Serialize};

use crate::CaeError;

const MAGIC: &[u8; 8] = b"CAECKPT2";
/// The first layout: no CRCs. Read, never written.
const MAGIC_V1: &[u8; 8] = b"CAECKPT1";
/// Sub-directory of a run dir that holds its checkpoints.
pub const CHECKPOINT_DIR: &str = "checkpoints";
const EXT: &str = "ckpt";

/// What a checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    /// Completed optimizer steps.
    pub step: u64,
    /// Where the data pipeline resumes (right after the last batch used by step `step`); rank
    /// 0's in a data-parallel run.
    pub loader: LoaderState,
    /// Processes of the data-parallel group that wrote it (1: a single process). A resume
    /// needs the same number.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: usize,
    /// Data parallel: every rank's loader state, in rank order (each rank resumes its stream).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_loaders: Vec<LoaderState>,
    /// The resolved run config, TOML.
    pub config: String,
    /// Loss of the last step, for listings.
    pub loss: Option<f64>,
    /// The shard source of the run (`--resume` reuses it when `--shards` is not given).
    #[serde(default)]
    pub shards: Option<String>,
    /// Dynamic loss-scale state (runs with loss scaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::precision::LossScaler>,
    /// File name of the checkpoint this one continues (the previous one of its lineage: the
    /// one the run resumed from, or the one it wrote before); `None` for a run's first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// `(name, byte length)` of every section, in file order.
    pub sections: Vec<(String, u64)>,
    /// CRC-32 (IEEE) of every section, in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub section_crc32: Vec<u32>,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl CheckpointHeader {
    /// Where rank `rank`'s data stream resumes.
    pub fn loader_for(&self, rank: usize) -> LoaderState {
        self.rank_loaders.get(rank).copied().unwrap_or(self.loader)
    }
}

/// A checkpoint read back: the header and its raw sections.
pub struct Checkpoint {
    pub path: PathBuf,
    pub header: CheckpointHeader,
    sections: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("path", &self.path).field("header", &self.header).finish_non_exhaustive()
    }
}

type Rec = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Encodes a burn record as a section.
pub fn encode_record<B: Backend, R: Record<B>>(record: R) -> Result<Vec<u8>, CaeError> {
    <Rec as Recorder<B>>::record(&Rec::default(), record, ())
        .map_err(|e| CaeError::Checkpoint { path: PathBuf::new(), reason: format!("encoding a record: {e}") })
}

/// Decodes a record encoded by [`encode_record`]; `what` names it in errors.
pub fn decode_record<B: Backend, R: Record<B>>(
    bytes: Vec<u8>,
    what: &str,
    path: &Path,
    device: &B::Device,
) -> Result<R, CaeError> {
    let bad = |reason: String| CaeError::Checkpoint { path: path.to_path_buf(), reason };
    // burn's decoder panics on some malformed input (e.g. a bad parameter id): an error.
    cae_pipeline::guard::catch_panic(|| <Rec as Recorder<B>>::load(&Rec::default(), bytes, device))
        .map_err(|e| bad(format!("{what} does not decode: {e}")))?
        .map_err(|e| bad(format!("{what} does not fit this model: {e}")))
}

impl Checkpoint {
    /// Decodes section `name` as a burn record.
    pub fn record<B: Backend, R: Record<B>>(&self, name: &str, device: &B::Device) -> Result<R, CaeError> {
        decode_record(self.section(name)?.to_vec(), &format!("section {name:?}"), &self.path, device)
    }

    /// Whether section `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.sections.iter().any(|(n, _)| n == name)
    }

    fn section(&self, name: &str) -> Result<&[u8], CaeError> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| CaeError::Checkpoint { path: self.path.clone(), reason: format!("no section {name:?}") })
    }

    /// The header alone (magic, header CRC), reading only the first bytes of the file.
    pub fn read_header(path: &Path) -> Result<CheckpointHeader, CaeError> {
        let mut f = fs::File::open(path).map_err(CaeError::io(path))?;
        let len = f.metadata().map_err(CaeError::io(path))?.len();
        let (header, _) = read_header_from(&mut f, path, len)?;
        Ok(header)
    }

    /// Checks a checkpoint file whole (header and every section's CRC-32) while streaming it:
    /// memory stays bounded whatever the file's size.
    pub fn verify(path: &Path) -> Result<CheckpointHeader, CaeError> {
        use std::io::Read;
        let bad = |reason: String| CaeError::Checkpoint { path: path.to_path_buf(), reason };
        let f = fs::File::open(path).map_err(CaeError::io(path))?;
        let len = f.metadata().map_err(CaeError::io(path))?.len();
        let mut r = std::io::BufReader::with_capacity(1 << 20, f);
        let (header, mut consumed) = read_header_from(&mut r, path, len)?;
        let crcs = &header.section_crc32;
        let mut buf = vec![0u8; 1 << 20];
        for (i, (name, n)) in header.sections.iter().enumerate() {
            let mut left = *n;
            let mut h = crc32fast::Hasher::new();
            while left > 0 {
                let take = left.min(buf.len() as u64) as usize;
                r.read_exact(&mut buf[..take]).map_err(|_| bad(format!("section {name:?} is truncated")))?;
                h.update(&buf[..take]);
                left -= take as u64;
            }
            consumed += n;
            if let Some(&want) = crcs.get(i) {
                let got = h.finalize();
                if got != want {
                    return Err(bad(format!(
                        "section {name:?} is corrupt: its CRC-32 is {got:08x}, the header says {want:08x}"
                    )));
                }
            }
        }
        if consumed != len {
            return Err(bad(format!("{} trailing bytes", len.saturating_sub(consumed))));
        }
        Ok(header)
    }

    /// Reads and checks a checkpoint file (magic, header, section lengths).
    pub fn read(path: &Path) -> Result<Self, CaeError> {
        let bytes = fs::read(path).map_err(CaeError::io(path))?;
        let bad = |reason: String| CaeError::Checkpoint { path: path.to_path_buf(), reason };
        let v2 = bytes.len() >= 20 && &bytes[..8] == MAGIC;
        if !v2 && (bytes.len() < 16 || &bytes[..8] != MAGIC_V1) {
            return Err(bad("not a CAE checkpoint (bad magic)".into()));
        }
        let u64_at = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let hlen = u64_at(8).unwrap_or(0) as usize;
        let body = &bytes[if v2 { 20 } else { 16 }..];
        if hlen > body.len() {
            return Err(bad(format!("header length {hlen} exceeds the file")));
        }
        let json = &body[..hlen];
        if v2 {
            let want = bytes.get(16..20).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes);
            let got = crc32fast::hash(json);
            if got != want {
                return Err(bad(format!("the header is corrupt: its CRC-32 is {got:08x}, the file says {want:08x}")));
            }
        }
        let header: CheckpointHeader = serde_json::from_slice(json).map_err(|e| bad(format!("bad header: {e}")))?;
        let mut rest = &body[hlen..];
        let mut sections = Vec::new();
        let crcs = &header.section_crc32;
        if (v2 || !crcs.is_empty()) && crcs.len() != header.sections.len() {
            return Err(bad(format!("{} section CRC-32s for {} sections", crcs.len(), header.sections.len())));
        }
        for (i, (name, n)) in header.sections.iter().enumerate() {
            let n = *n as usize;
            if n > rest.len() {
                return Err(bad(format!("section {name:?} is truncated")));
            }
            let (section, tail) = rest.split_at(n);
            if let Some(&want) = crcs.get(i) {
                let got = crc32fast::hash(section);
                if got != want {
                    return Err(bad(format!(
                        "section {name:?} is corrupt: its CRC-32 is {got:08x}, the header says {want:08x}"
                    )));
                }
            }
            sections.push((name.clone(), section.to_vec()));
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        Ok(Self { path: path.to_path_buf(), header, sections })
    }
}

/// The header of a checkpoint from its first bytes (`len`: the file's size), checked (magic,
/// header CRC, declared sizes within the file); returns it and the bytes consumed.
fn read_header_from(r: &mut impl std::io::Read, path: &Path, len: u64) -> Result<(CheckpointHeader, u64), CaeError> {
    let bad = |reason: String| CaeError::Checkpoint { path: path.to_path_buf(), reason };
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic).map_err(|_| bad("not a CAE checkpoint (too short)".into()))?;
    let v2 = &magic[..8] == MAGIC;
    if !v2 && &magic[..8] != MAGIC_V1 {
        return Err(bad("not a CAE checkpoint (bad magic)".into()));
    }
    let hlen = u64::from_le_bytes(magic[8..16].try_into().unwrap_or_default());
    let mut want_crc = [0u8; 4];
    if v2 {
        r.read_exact(&mut want_crc).map_err(|_| bad("truncated header".into()))?;
    }
    let start = if v2 { 20 } else { 16 };
    if hlen > len.saturating_sub(start) {
        return Err(bad(format!("header length {hlen} exceeds the file")));
    }
    let mut json = vec![0u8; hlen as usize];
    r.read_exact(&mut json).map_err(|_| bad("truncated header".into()))?;
    if v2 {
        let (got, want) = (crc32fast::hash(&json), u32::from_le_bytes(want_crc));
        if got != want {
            return Err(bad(format!("the header is corrupt: its CRC-32 is {got:08x}, the file says {want:08x}")));
        }
    }
    let header: CheckpointHeader = serde_json::from_slice(&json).map_err(|e| bad(format!("bad header: {e}")))?;
    let declared: u64 = header.sections.iter().map(|(_, n)| *n).sum();
    if declared > len - start - hlen {
        return Err(bad(format!("its sections declare {declared} bytes, more than the file holds")));
    }
    Ok((header, start + hlen))
}

/// File name of the checkpoint of `step`.
pub fn file_name(step: u64) -> String {
    format!("step-{step:08}.{EXT}")
}

fn step_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("step-")?.strip_suffix(&format!(".{EXT}"))?.parse().ok()
}

/// Checkpoints of a run dir (`<run>/checkpoints/`), or of a checkpoints dir itself, sorted by step.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CaeError> {
    let ckdir = if dir.join(CHECKPOINT_DIR).is_dir() { dir.join(CHECKPOINT_DIR) } else { dir.to_path_buf() };
    let mut out = Vec::new();
    for e in fs::read_dir(&ckdir).map_err(CaeError::io(&ckdir))? {
        let p = e.map_err(CaeError::io(&ckdir))?.path();
        if let Some(s) = step_of(&p) {
            out.push((s, p));
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint path from `--resume` / `--checkpoint`: a file as it is; a directory (run dir
/// or its `checkpoints/`) means its newest **valid** checkpoint: a corrupt newer one (torn copy,
/// bad CRC) is skipped with a warning naming it and why.
pub fn locate(path: &Path) -> Result<PathBuf, CaeError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(CaeError::Checkpoint { path: path.to_path_buf(), reason: "no such file or directory".into() });
    }
    let all = list(path)?;
    if all.is_empty() {
        return Err(CaeError::Checkpoint {
            path: path.to_path_buf(),
            reason: "no checkpoint (step-*.ckpt) in this directory".into(),
        });
    }
    for (_, p) in all.iter().rev() {
        match Checkpoint::verify(p) {
            Ok(_) => return Ok(p.clone()),
            Err(e) => {
                tracing::warn!("skipping a corrupt checkpoint: {e}");
                say_err!("warning: skipping a corrupt checkpoint: {e}");
            }
        }
    }
    Err(CaeError::Checkpoint {
        path: path.to_path_buf(),
        reason: "every checkpoint in this directory is corrupt".into(),
    })
}

/// Moves the checkpoints of `run_dir` after `step` (an abandoned branch: the run was rewound to
/// `step`) into `checkpoints/abandoned-<stamp>/`, never deleting them. Returns that directory
/// when anything moved.
pub fn abandon_after(run_dir: &Path, step: u64, stamp: &str) -> Result<Option<PathBuf>, CaeError> {
    let dir = run_dir.join(CHECKPOINT_DIR);
    if !dir.is_dir() {
        return Ok(None);
    }
    let later: Vec<PathBuf> = list(&dir)?.into_iter().filter(|(s, _)| *s > step).map(|(_, p)| p).collect();
    if later.is_empty() {
        return Ok(None);
    }
    let mut aside = dir.join(format!("abandoned-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = dir.join(format!("abandoned-{stamp}-{n}"));
    }
    fs::create_dir(&aside).map_err(CaeError::io(&aside))?;
    for p in later {
        let to = aside.join(p.file_name().unwrap_or_default());
        fs::rename(&p, &to).map_err(CaeError::io(&to))?;
    }
    Ok(Some(aside))
}

/// The run dir a checkpoint file belongs to (`<run>/checkpoints/step-N.ckpt` -> `<run>`).
pub fn run_dir_of(ckpt: &Path) -> Option<PathBuf> {
    let parent = ckpt.parent()?;
    if parent.file_name()? == CHECKPOINT_DIR { parent.parent().map(Path::to_path_buf) } else { None }
}

/// Writes a checkpoint atomically into `<run_dir>/checkpoints/` and keeps the last `keep_last`.
/// Returns the final path.
pub fn write(
    run_dir: &Path,
    header: &CheckpointHeader,
    sections: &[(&str, Vec<u8>)],
    keep_last: usize,
) -> Result<PathBuf, CaeError> {
    let dir = run_dir.join(CHECKPOINT_DIR);
    fs::create_dir_all(&dir).map_err(CaeError::io(&dir))?;
    let mut header = header.clone();
    header.sections = sections.iter().map(|(n, b)| (n.to_string(), b.len() as u64)).collect();
    header.section_crc32 = sections.iter().map(|(_, b)| crc32fast::hash(b)).collect();
    let json = serde_json::to_vec(&header)
        .map_err(|e| CaeError::Checkpoint { path: dir.clone(), reason: format!("header: {e}") })?;
    let path = dir.join(file_name(header.step));
    let tmp = dir.join(format!("{}.tmp", file_name(header.step)));
    {
        let mut f = fs::File::create(&tmp).map_err(CaeError::io(&tmp))?;
        f.write_all(MAGIC).map_err(CaeError::io(&tmp))?;
        f.write_all(&(json.len() as u64).to_le_bytes()).map_err(CaeError::io(&tmp))?;
        f.write_all(&crc32fast::hash(&json).to_le_bytes()).map_err(CaeError::io(&tmp))?;
        f.write_all(&json).map_err(CaeError::io(&tmp))?;
        for (_, b) in sections {
            f.write_all(b).map_err(CaeError::io(&tmp))?;
        }
        f.sync_all().map_err(CaeError::io(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(CaeError::io(&path))?;
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    prune(&dir, keep_last)?;
    Ok(path)
}

/// Deletes all but the newest `keep_last` checkpoints, and stale temp files.
fn prune(dir: &Path, keep_last: usize) -> Result<(), CaeError> {
    let all = list(dir)?;
    let excess = all.len().saturating_sub(keep_last.max(1));
    for (_, p) in &all[..excess] {
        fs::remove_file(p).map_err(CaeError::io(p))?;
    }
    for e in fs::read_dir(dir).map_err(CaeError::io(dir))?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            let _ = fs::remove_file(&p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(step: u64) -> CheckpointHeader {
        CheckpointHeader {
            step,
            loader: LoaderState { epoch: 1, batch: 2, consumed: 70, ..LoaderState::default() },
            world_size: 1,
            rank_loaders: Vec::new(),
            config: "preset = \"micro\"".into(),
            loss: Some(1.5),
            shards: Some("data/shards".into()),
            loss_scaler: None,
            parent: None,
            sections: Vec::new(),
            section_crc32: Vec::new(),
        }
    }

    #[test]
    fn a_group_checkpoint_keeps_every_rank_stream_and_old_ones_are_one_process() {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = header(5);
        let ranks = [LoaderState { batch: 3, ..h.loader }, LoaderState { batch: 4, consumed: 9, ..h.loader }];
        (h.world_size, h.rank_loaders) = (2, ranks.to_vec());
        let back = Checkpoint::read_header(&write(tmp.path(), &h, &[("a", vec![1])], 1).unwrap()).unwrap();
        assert_eq!((back.world_size, back.loader_for(1)), (2, ranks[1]));
        // A header without the keys (every checkpoint before data parallel): one process.
        let mut json = serde_json::to_value(header(6)).unwrap();
        json.as_object_mut().unwrap().retain(|k, _| k != "world_size" && k != "rank_loaders");
        let old: CheckpointHeader = serde_json::from_value(json).unwrap();
        assert_eq!((old.world_size, old.loader_for(0)), (1, header(6).loader));
    }

    #[test]
    fn write_read_keep_last_and_locate() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        for step in [10, 20, 30, 40] {
            write(run, &header(step), &[("a", vec![1, 2, 3]), ("b", vec![step as u8; 5])], 2).unwrap();
        }
        let steps: Vec<u64> = list(run).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![30, 40]);
        let latest = locate(run).unwrap();
        assert_eq!(latest, run.join(CHECKPOINT_DIR).join("step-00000040.ckpt"));
        assert_eq!(run_dir_of(&latest).as_deref(), Some(run));
        let c = Checkpoint::read(&latest).unwrap();
        assert_eq!(c.header.step, 40);
        assert_eq!(c.header.loader, LoaderState { epoch: 1, batch: 2, consumed: 70, ..LoaderState::default() });
        assert_eq!(c.section("a").unwrap(), &[1, 2, 3]);
        assert_eq!(c.section("b").unwrap(), &[40; 5]);
        assert!(c.section("c").is_err());
    }

    #[test]
    fn truncated_or_foreign_files_are_refused_and_tmp_files_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(tmp.path(), &header(5), &[("model", vec![9; 100])], 3).unwrap();
        let bytes = fs::read(&p).unwrap();
        let cut = tmp.path().join("cut.ckpt");
        fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        assert!(Checkpoint::read(&cut).unwrap_err().to_string().contains("truncated"));
        fs::write(&cut, b"PK\x03\x04 not ours").unwrap();
        assert!(Checkpoint::read(&cut).unwrap_err().to_string().contains("magic"));
        // A temp file left by a crash is not a checkpoint.
        fs::write(tmp.path().join(CHECKPOINT_DIR).join("step-00000009.ckpt.tmp"), b"half").unwrap();
        assert_eq!(locate(tmp.path()).unwrap(), p);
    }

    #[test]
    fn a_corrupt_header_or_section_is_named_and_old_files_without_crcs_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(tmp.path(), &header(5), &[("model", vec![9; 100]), ("optimizer", vec![7; 50])], 3).unwrap();
        let good = fs::read(&p).unwrap();
        let n = good.len();
        let bad = tmp.path().join("bad.ckpt");
        let mut bytes = good.clone();
        bytes[n - 60] ^= 0x10; // inside "model", 10 bytes before "optimizer" starts
        fs::write(&bad, &bytes).unwrap();
        let e = Checkpoint::read(&bad).unwrap_err().to_string();
        assert!(e.contains("section \"model\" is corrupt") && e.contains("CRC-32"), "{e}");
        // A header that still parses but says another step ("step":5 -> "step":7).
        let text = String::from_utf8_lossy(&good).into_owned();
        let at = text.find("\"step\":5").expect("the header holds the step") + 7;
        let mut bytes = good.clone();
        bytes[at] = b'7';
        fs::write(&bad, &bytes).unwrap();
        let e = Checkpoint::read(&bad).unwrap_err().to_string();
        assert!(e.contains("the header is corrupt"), "{e}");
        // CRC-32s dropped from a new-layout header: refused, not read unchecked.
        let mut h = Checkpoint::read(&p).unwrap().header;
        h.section_crc32.clear();
        let json = serde_json::to_vec(&h).unwrap();
        let mut file = MAGIC.to_vec();
        file.extend((json.len() as u64).to_le_bytes());
        file.extend(crc32fast::hash(&json).to_le_bytes());
        file.extend(json);
        file.extend(&good[n - 150..]);
        fs::write(&bad, file).unwrap();
        let e = Checkpoint::read(&bad).unwrap_err().to_string();
        assert!(e.contains("0 section CRC-32s for 2 sections"), "{e}");

        // The first layout: no header CRC, no `section_crc32` in the header.
        let c = Checkpoint::read(&p).unwrap();
        let mut old = c.header.clone();
        old.section_crc32.clear();
        let json = serde_json::to_vec(&old).unwrap();
        assert!(!String::from_utf8_lossy(&json).contains("crc32"));
        let mut file = MAGIC_V1.to_vec();
        file.extend((json.len() as u64).to_le_bytes());
        file.extend(json);
        file.extend(vec![9; 100]);
        file.extend(vec![7; 50]);
        let legacy = tmp.path().join("legacy.ckpt");
        fs::write(&legacy, file).unwrap();
        let c = Checkpoint::read(&legacy).unwrap();
        assert_eq!(c.section("optimizer").unwrap(), &[7; 50]);
    }

    #[test]
    fn a_record_that_burn_cannot_decode_is_an_error_not_a_panic() {
        type B = burn::backend::Flex;
        let dev = Default::default();
        let ln = crate::model::init::layer_norm::<B>(8, 1e-6, &dev);
        let id = ln.gamma.id.serialize();
        let mut section = encode_record::<B, _>(burn::module::Module::into_record(ln)).unwrap();
        let at = section.windows(id.len()).position(|w| w == id.as_bytes()).expect("the param id is in the record");
        section[at] = b'!'; // not base32: burn's ParamId::deserialize panics on it
        let tmp = tempfile::tempdir().unwrap();
        let p = write(tmp.path(), &header(1), &[("model", section)], 1).unwrap();
        let c = Checkpoint::read(&p).unwrap();
        let e = match c.record::<B, burn::nn::LayerNormRecord<B>>("model", &dev) {
            Ok(_) => panic!("a corrupt record decoded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("section \"model\" does not decode"), "{e}");
    }

    /// Streaming verification agrees with the full read: it accepts a good file, and names the
    /// section of a flipped byte, a truncation and declared sizes beyond the file.
    #[test]
    fn verify_streams_and_agrees_with_read() {
        let tmp = tempfile::tempdir().unwrap();
        let sections = [("model", vec![7u8; 3 << 20]), ("optimizer", vec![9u8; 1000])];
        let path = write(tmp.path(), &header(3), &sections, 5).unwrap();
        assert_eq!(Checkpoint::verify(&path).unwrap().step, 3);
        assert_eq!(Checkpoint::read_header(&path).unwrap().sections.len(), 2);
        let good = fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 10] ^= 1;
        fs::write(&path, &flipped).unwrap();
        let e = Checkpoint::verify(&path).unwrap_err().to_string();
        assert!(e.contains("\"optimizer\" is corrupt"), "{e}");
        assert!(Checkpoint::read(&path).is_err());
        fs::write(&path, &good[..good.len() - 500]).unwrap();
        let e = Checkpoint::verify(&path).unwrap_err().to_string();
        assert!(e.contains("more than the file holds"), "{e}");
        assert!(Checkpoint::read_header(&path).is_err(), "sizes beyond the file are refused before reading them");
    }
}
