//! An epoch's sample stream: the rank's shards in the epoch's order, read one after the other
//! (wrapping around when the epoch length is known), through the shuffle buffer.
//!
//! The stream is generic over what a sample is ([`Feed`]): the same code runs on real samples
//! and, to resume, on `(shard, index)` placeholders made from the manifest's counts. Every
//! random choice of the shuffle buffer depends only on how many items it holds, never on their
//! bytes (except when the byte cap is hit, which the stream records), so a placeholder run
//! reproduces exactly which samples sit in the buffer at any position: resuming reads only the
//! shards those samples come from, plus the one being read.
//!
//! Shuffle buffer: each new sample enters; once it holds `cap` samples (or `max_bytes`), a
//! random one leaves per sample read. No sample stays longer than `max_age` reads (the oldest
//! leaves first when it reaches that age), so the buffer only ever holds samples of the last
//! `max_age` reads: with `max_age = cap + samples_per_shard` that is at most
//! `cap / samples_per_shard + 2` shards, the resume cost. At the end of each pass over the
//! shard list the buffer drains, so an epoch sees every sample of its list before any repeats.

use std::collections::VecDeque;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Why the stream stops early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Halt {
    /// The loader is shutting down (or the run stopped with an error already reported).
    Stop,
    /// A whole pass over the shard list read nothing.
    NoData,
}

struct Slot<T> {
    read: u64,
    bytes: u64,
    item: T,
}

/// The shuffle buffer, bounded in samples, bytes and age.
pub(super) struct ShuffleBuffer<T> {
    items: Vec<Slot<T>>,
    cap: usize,
    max_bytes: u64,
    max_age: u64,
    bytes: u64,
    /// Items pushed so far: the next one's read number.
    reads: u64,
    /// Alive flags of read numbers `base..reads` (front = the oldest item still held).
    alive: VecDeque<bool>,
    base: u64,
    rng: ChaCha8Rng,
    /// Whether the byte cap ever forced a sample out (then the order depends on the bytes).
    pub(super) byte_capped: bool,
}

impl<T> ShuffleBuffer<T> {
    pub(super) fn new(cap: usize, max_bytes: u64, max_age: u64, seed: u64) -> Self {
        Self {
            items: Vec::with_capacity(cap.max(1) + 1),
            cap: cap.max(1),
            max_bytes: max_bytes.max(1),
            max_age: max_age.max(cap.max(1) as u64 + 1),
            bytes: 0,
            reads: 0,
            alive: VecDeque::new(),
            base: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            byte_capped: false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether one more sample would make one leave.
    fn full(&self) -> bool {
        self.items.len() >= self.cap || self.bytes >= self.max_bytes
    }

    fn push(&mut self, item: T, bytes: u64) {
        self.items.push(Slot { read: self.reads, bytes, item });
        self.reads += 1;
        self.alive.push_back(true);
        self.bytes += bytes;
    }

    fn take(&mut self, i: usize) -> T {
        let slot = self.items.swap_remove(i);
        self.bytes -= slot.bytes;
        if let Some(a) = self.alive.get_mut((slot.read - self.base) as usize) {
            *a = false;
        }
        while self.alive.front() == Some(&false) {
            self.alive.pop_front();
            self.base += 1;
        }
        slot.item
    }

    /// The sample that must leave now (over `cap`, over `max_bytes`, or too old), if any.
    fn due(&mut self) -> Option<T> {
        let over_bytes = self.bytes > self.max_bytes && self.items.len() > 1;
        let too_old = !self.items.is_empty() && self.reads - self.base > self.max_age;
        if self.items.len() <= self.cap && !over_bytes && !too_old {
            return None;
        }
        self.byte_capped |= over_bytes && self.items.len() <= self.cap;
        // Always one draw, so the RNG's sequence depends only on the item counts.
        let j = self.rng.random_range(0..self.items.len());
        let i = if too_old { self.items.iter().position(|s| s.read == self.base).unwrap_or(j) } else { j };
        Some(self.take(i))
    }

    /// A random sample (draining at the end of a pass).
    fn pop(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.items.len());
        Some(self.take(j))
    }

    /// The same buffer (slots, ages, RNG state) over other items: placeholders -> samples.
    pub(super) fn map<U>(self, mut f: impl FnMut(T) -> (U, u64)) -> ShuffleBuffer<U> {
        let mut bytes = 0;
        let items = self
            .items
            .into_iter()
            .map(|s| {
                let (item, b) = f(s.item);
                bytes += b;
                Slot { read: s.read, bytes: b, item }
            })
            .collect();
        ShuffleBuffer {
            items,
            cap: self.cap,
            max_bytes: self.max_bytes,
            max_age: self.max_age,
            bytes,
            reads: self.reads,
            alive: self.alive,
            base: self.base,
            rng: self.rng,
            byte_capped: self.byte_capped,
        }
    }

    /// The items held, in slot order.
    pub(super) fn items(&self) -> impl Iterator<Item = &T> {
        self.items.iter().map(|s| &s.item)
    }
}

/// Where a stream's samples come from.
pub(super) trait Feed {
    type Item;
    /// Starts shard `k` of the epoch's list, in pass `pass` (a shard that cannot be opened is
    /// reported by the feed and reads as empty).
    fn start(&mut self, k: usize, pass: u32) -> Result<(), Halt>;
    /// The next sample of the shard being read, with its size in bytes; `None` at its end.
    fn next(&mut self) -> Result<Option<(Self::Item, u64)>, Halt>;
}

/// An epoch's stream (see the module docs).
pub(super) struct Stream<F: Feed> {
    pub(super) feed: F,
    /// Shards in the epoch's list.
    shards: usize,
    /// List position of the next shard to start.
    pub(super) next_shard: usize,
    /// Whether a shard is being read.
    pub(super) reading: bool,
    pub(super) pass: u32,
    read_this_pass: u64,
    draining: bool,
    /// Known epoch length: wrap around the list until the consumer has its batches.
    wrap: bool,
    /// A sample that left the buffer while it was being filled ahead of time.
    ready: Option<F::Item>,
    /// Samples that left the buffer so far: the stream's position.
    pub(super) seq: u64,
    pub(super) buffer: ShuffleBuffer<F::Item>,
}

impl<F: Feed> Stream<F> {
    pub(super) fn new(feed: F, shards: usize, wrap: bool, buffer: ShuffleBuffer<F::Item>) -> Self {
        Self {
            feed,
            shards,
            next_shard: 0,
            reading: false,
            pass: 0,
            read_this_pass: 0,
            draining: false,
            wrap,
            ready: None,
            seq: 0,
            buffer,
        }
    }

    /// Reads one sample into the buffer; `Ok(None)` at the end of the list.
    fn read_one(&mut self) -> Result<Option<()>, Halt> {
        loop {
            if !self.reading {
                if self.next_shard == self.shards {
                    return Ok(None);
                }
                self.feed.start(self.next_shard, self.pass)?;
                self.next_shard += 1;
                self.reading = true;
            }
            match self.feed.next()? {
                Some((item, bytes)) => {
                    self.read_this_pass += 1;
                    self.buffer.push(item, bytes);
                    return Ok(Some(()));
                }
                None => self.reading = false,
            }
        }
    }

    /// The next sample out of the buffer; `Ok(None)` when an unknown-length epoch is exhausted.
    pub(super) fn next(&mut self) -> Result<Option<F::Item>, Halt> {
        let out = self.next_inner()?;
        self.seq += out.is_some() as u64;
        Ok(out)
    }

    fn next_inner(&mut self) -> Result<Option<F::Item>, Halt> {
        if let Some(x) = self.ready.take() {
            return Ok(Some(x));
        }
        loop {
            if !self.draining {
                if let Some(x) = self.buffer.due() {
                    return Ok(Some(x));
                }
                if self.read_one()?.is_none() {
                    self.draining = true;
                }
                continue;
            }
            // Drain at the end of every pass, so that every sample of the pass comes out before
            // any sample of the next one.
            if let Some(x) = self.buffer.pop() {
                return Ok(Some(x));
            }
            if self.read_this_pass == 0 {
                return Err(Halt::NoData);
            }
            if !self.wrap {
                return Ok(None);
            }
            (self.pass, self.next_shard, self.read_this_pass, self.draining) = (self.pass + 1, 0, 0, false);
        }
    }

    /// The same position over another feed, the buffered items mapped (with their sizes):
    /// a placeholder run at a resume position becomes the real stream.
    pub(super) fn replace_feed<G: Feed>(self, feed: G, f: impl FnMut(F::Item) -> (G::Item, u64)) -> Stream<G> {
        Stream {
            feed,
            shards: self.shards,
            next_shard: self.next_shard,
            reading: self.reading,
            pass: self.pass,
            read_this_pass: self.read_this_pass,
            draining: self.draining,
            wrap: self.wrap,
            ready: None,
            seq: self.seq,
            buffer: self.buffer.map(f),
        }
    }

    /// Fills the buffer ahead of time by one sample, without letting any out for the consumer
    /// (the next epoch's buffer, filled during this epoch's tail); false when it is full.
    pub(super) fn prefill_one(&mut self) -> Result<bool, Halt> {
        if self.ready.is_some() || self.draining || self.buffer.full() {
            return Ok(false);
        }
        if self.read_one()?.is_none() {
            self.draining = true;
            return Ok(false);
        }
        self.ready = self.buffer.due();
        Ok(true)
    }
}

/// A placeholder sample: (list position of its shard, index in the shard).
pub(super) type Placeholder = (usize, u64);

/// Samples made from the manifest's counts: what the stream would hold, without reading.
pub(super) struct CountFeed {
    /// Sample count of each shard of the list, in list order.
    pub(super) counts: Vec<u64>,
    pub(super) shard: usize,
    /// Samples of `shard` given so far.
    pub(super) index: u64,
}

impl Feed for CountFeed {
    type Item = Placeholder;
    fn start(&mut self, k: usize, _pass: u32) -> Result<(), Halt> {
        (self.shard, self.index) = (k, 0);
        Ok(())
    }
    fn next(&mut self) -> Result<Option<(Placeholder, u64)>, Halt> {
        if self.index >= self.counts[self.shard] {
            return Ok(None);
        }
        self.index += 1;
        Ok(Some(((self.shard, self.index - 1), 0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn stream(counts: Vec<u64>, cap: usize, max_age: u64, wrap: bool) -> Stream<CountFeed> {
        let n = counts.len();
        let feed = CountFeed { counts, shard: 0, index: 0 };
        Stream::new(feed, n, wrap, ShuffleBuffer::new(cap, u64::MAX, max_age, 42))
    }

    #[test]
    fn every_sample_once_per_pass_and_the_buffer_never_holds_old_shards() {
        let (cap, per_shard) = (20usize, 10u64);
        let mut s = stream(vec![per_shard; 12], cap, cap as u64 + per_shard, false);
        let mut seen = HashSet::new();
        let mut max_shards = 0;
        while let Some(x) = s.next().expect("no halt") {
            assert!(seen.insert(x), "{x:?} twice");
            let shards: HashSet<usize> =
                s.buffer.items().map(|p| p.0).chain(s.reading.then(|| s.next_shard - 1)).collect();
            max_shards = max_shards.max(shards.len());
        }
        assert_eq!(seen.len(), 120);
        // cap / samples_per_shard + 2 = 4 shards at most, whatever the position.
        assert!(max_shards <= cap / per_shard as usize + 2, "{max_shards} shards held");
        assert!(max_shards >= 3, "the buffer spans shards");
        // Shuffled: not in reading order.
        let mut s = stream(vec![per_shard; 12], cap, cap as u64 + per_shard, false);
        let first: Vec<Placeholder> = (0..30).map(|_| s.next().unwrap().unwrap()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_ne!(first, sorted);
    }

    #[test]
    fn prefilling_does_not_change_the_order() {
        let counts = vec![7, 9, 3, 12];
        let mut plain = stream(counts.clone(), 8, 20, true);
        let mut ahead = stream(counts, 8, 20, true);
        while ahead.prefill_one().expect("fill") {}
        for _ in 0..80 {
            assert_eq!(plain.next().unwrap(), ahead.next().unwrap());
        }
    }

    #[test]
    fn the_byte_cap_bounds_the_buffer_and_is_recorded() {
        let mut b = ShuffleBuffer::new(100, 1000, 1000, 1);
        let mut out = 0;
        for i in 0..50u32 {
            b.push(i, 300);
            while b.due().is_some() {
                out += 1;
            }
            assert!(b.bytes() <= 1000, "{} bytes held", b.bytes());
        }
        assert_eq!(b.len() + out, 50);
        assert!(b.byte_capped);
        // A single sample over the cap still passes (alone in the buffer).
        let mut b = ShuffleBuffer::new(4, 10, 100, 1);
        b.push(1u8, 500);
        assert!(b.due().is_none());
        assert!(!b.byte_capped);
    }
}
