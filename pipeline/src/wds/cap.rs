//! A cap on tar member sizes that works below the tar parser: oversized members are skipped
//! while streaming, never read into memory whole.
//!
//! [`MemberCap`] sits between the byte source and [`webdataset::shard::TarEntries`] (which
//! reads every member whole). It follows the tar block structure as the parser reads it; when a
//! regular file's header claims more than `max` bytes, it hands the parser the same header with
//! size 0 (checksum fixed) and discards the payload in 64 KiB pieces. The parser then yields an
//! empty member, and the reader learns from the shared log that it was skipped (one entry per
//! regular member, in order).

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};

const BLOCK: usize = 512;
const SIZE: std::ops::Range<usize> = 124..136;
const CHECKSUM: std::ops::Range<usize> = 148..156;
const TYPEFLAG: usize = 156;

/// Per regular member, in archive order: `Some(size)` when it was skipped for its size.
pub(crate) type SkipLog = Arc<Mutex<VecDeque<Option<u64>>>>;

pub(crate) struct MemberCap<R> {
    inner: R,
    max: u64,
    log: SkipLog,
    header: [u8; BLOCK],
    /// Bytes of `header` filled (while < BLOCK) or served (`served`).
    filled: usize,
    served: usize,
    /// Payload (and padding) bytes of the current member still to pass through.
    payload_left: u64,
    /// The stream ended inside a skipped payload: reported as an error on the next read.
    truncated: bool,
}

impl<R: Read> MemberCap<R> {
    pub(crate) fn new(inner: R, max: u64, log: SkipLog) -> Self {
        Self { inner, max, log, header: [0; BLOCK], filled: 0, served: BLOCK, payload_left: 0, truncated: false }
    }

    /// Reads the next header block whole (or what the stream has), then inspects it.
    fn next_header(&mut self) -> std::io::Result<()> {
        self.filled = 0;
        while self.filled < BLOCK {
            match self.inner.read(&mut self.header[self.filled..])? {
                0 => break,
                n => self.filled += n,
            }
        }
        self.served = 0;
        if self.filled < BLOCK || self.header.iter().all(|&b| b == 0) || !checksum_ok(&self.header) {
            return Ok(()); // end marker, short read or broken header: the parser reports it
        }
        let Some(size) = parse_size(&self.header[SIZE]) else { return Ok(()) };
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let regular = matches!(self.header[TYPEFLAG], b'0' | b'\0' | b'7');
        if regular && size > self.max {
            self.log_member(Some(size));
            self.header[SIZE].copy_from_slice(b"00000000000\0");
            write_checksum(&mut self.header);
            let mut scratch = vec![0u8; 64 << 10];
            let mut left = padded;
            while left > 0 {
                let want = left.min(scratch.len() as u64) as usize;
                match self.inner.read(&mut scratch[..want])? {
                    0 => {
                        self.truncated = true;
                        break;
                    }
                    n => left -= n as u64,
                }
            }
        } else {
            if regular {
                self.log_member(None);
            }
            self.payload_left = padded;
        }
        Ok(())
    }

    fn log_member(&self, entry: Option<u64>) {
        if let Ok(mut log) = self.log.lock() {
            log.push_back(entry);
        }
    }
}

impl<R: Read> Read for MemberCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.served < self.filled {
            let n = buf.len().min(self.filled - self.served);
            buf[..n].copy_from_slice(&self.header[self.served..self.served + n]);
            self.served += n;
            return Ok(n);
        }
        if self.truncated {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tar ends inside a skipped member"));
        }
        if self.payload_left > 0 {
            let want = (buf.len() as u64).min(self.payload_left) as usize;
            let n = self.inner.read(&mut buf[..want])?;
            self.payload_left -= n as u64;
            return Ok(n);
        }
        self.next_header()?;
        if self.filled == 0 {
            return Ok(0);
        }
        self.read(buf)
    }
}

/// Octal (NUL/space terminated) or GNU base-256 size field.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        return field[1..].iter().try_fold(0u64, |acc, &b| acc.checked_mul(256)?.checked_add(b as u64));
    }
    let text = std::str::from_utf8(field).ok()?.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn sums(header: &[u8; BLOCK]) -> (u64, i64) {
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in header.iter().enumerate() {
        let v = if CHECKSUM.contains(&i) { b' ' } else { b };
        unsigned += v as u64;
        signed += v as i8 as i64;
    }
    (unsigned, signed)
}

fn checksum_ok(header: &[u8; BLOCK]) -> bool {
    let Some(stored) = parse_size(&header[CHECKSUM]) else { return false };
    let (unsigned, signed) = sums(header);
    stored == unsigned || stored as i64 == signed
}

fn write_checksum(header: &mut [u8; BLOCK]) {
    let (unsigned, _) = sums(header);
    let text = format!("{unsigned:06o}\0 ");
    header[CHECKSUM].copy_from_slice(text.as_bytes());
}
