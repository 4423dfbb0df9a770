//! Writing shards: reproducible tar members (see the contract in [`super`]), hashed and counted
//! as they are written, fsynced on finish.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use webdataset::shard::compress::Compression;
use webdataset::{Sample, TarWriter, Value};

use super::{FIXED_MTIME, WdsError};

/// Size and digest of a finished shard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardDigest {
    pub samples: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Default)]
struct HashState {
    hasher: Sha256,
    bytes: u64,
}

/// A writer that hashes and counts everything that passes through.
struct HashingWriter {
    inner: BufWriter<File>,
    state: Arc<Mutex<HashState>>,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let mut st = self.state.lock().map_err(|_| std::io::Error::other("hash state poisoned"))?;
        st.hasher.update(&buf[..n]);
        st.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one shard file reproducibly, hashing as it goes. Call [`ShardWriter::finish`] to write
/// the trailer, flush and fsync; dropping it unfinished leaves an incomplete file (write to a
/// temporary name and rename, see the sharder).
pub struct ShardWriter {
    tar: TarWriter,
    file: File,
    state: Arc<Mutex<HashState>>,
    samples: u64,
}

impl ShardWriter {
    pub fn create(path: &Path) -> Result<Self, WdsError> {
        let file = File::create(path)?;
        let state = Arc::new(Mutex::new(HashState::default()));
        let out = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file.try_clone()?), state: state.clone() };
        let tar = TarWriter::new(Box::new(out), Compression::None)
            .map_err(|e| WdsError::Write(e.to_string()))?
            .with_mtime(Some(FIXED_MTIME))
            .with_mode(0o444);
        Ok(Self { tar, file, state, samples: 0 })
    }

    /// Appends one sample; members are written sorted by extension. `key` must not contain a dot.
    pub fn write_sample(&mut self, key: &str, fields: &[(&str, &[u8])]) -> Result<(), WdsError> {
        if key.contains('.') || key.is_empty() {
            return Err(WdsError::Write(format!("invalid sample key {key:?} (empty or contains a dot)")));
        }
        let mut sample = Sample::with_key(key);
        for (ext, bytes) in fields {
            if sample.insert(*ext, Value::Bytes(bytes.to_vec().into())).is_some() {
                return Err(WdsError::DuplicateExtension { key: key.to_string(), ext: ext.to_string() });
            }
        }
        self.tar.write(&sample).map_err(|e| WdsError::Write(format!("sample {key}: {e}")))?;
        self.samples += 1;
        Ok(())
    }

    /// Samples written so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Bytes written so far (approximate until finished: buffered data counts once flushed).
    pub fn bytes_written(&self) -> u64 {
        self.state.lock().map(|s| s.bytes).unwrap_or(0)
    }

    /// Writes the end-of-archive marker, flushes and fsyncs.
    pub fn finish(self) -> Result<ShardDigest, WdsError> {
        let (digest, file) = self.finish_unsynced()?;
        file.sync_all()?;
        Ok(digest)
    }

    /// Writes the end-of-archive marker and flushes, but leaves the fsync to the caller (who can
    /// overlap it with other work): returns the digest and the file to sync.
    pub fn finish_unsynced(self) -> Result<(ShardDigest, File), WdsError> {
        let Self { tar, file, state, samples } = self;
        tar.close().map_err(|e| WdsError::Write(e.to_string()))?;
        let st = state.lock().map_err(|_| WdsError::Write("hash state poisoned".into()))?;
        Ok((ShardDigest { samples, bytes: st.bytes, sha256: hex::encode(st.hasher.clone().finalize()) }, file))
    }
}

/// sha256 of a whole file, streamed.
pub fn sha256_file(path: &Path) -> Result<(u64, String), std::io::Error> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(h.finalize())))
}
