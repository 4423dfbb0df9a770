//! The reader thread: per-epoch shard order, tar reading, the shuffle buffer ([`stream`]), and
//! how much of each epoch goes to the workers.
//!
//! Known epoch length (counts from a manifest): the reader submits exactly as many samples as
//! the epoch can still use — `needed + bad samples seen so far` — so nothing past the epoch's
//! end is ever decoded. In the epoch's tail (everything it needs is in flight) it keeps the next
//! `3 x K` samples of the stream (more than can be in flight) as a reserve (for bad samples found in flight), drops the epoch's
//! buffer, and reads the next epoch's shards into that epoch's buffer: when the assembler
//! closes the epoch, the next one's samples are ready, with no stall at the boundary.
//!
//! [`stream`]: super::stream

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::assemble::Progress;
use super::stream::{CountFeed, Feed, Halt, Placeholder, ShuffleBuffer, Stream};
use super::{BUFFER_SALT, Job, LoaderConfig, LoaderError, LoaderState, LoaderStats, Work, mix};
use crate::batch::Batch;
use crate::http::HttpFetcher;
use crate::metrics as m;
use crate::ordered_map::Submitter;
use crate::read::{BrokenSample, ReadConfig, ShardFailures, ShardItem, ShardReader, ShardSamples, open_shard};
use crate::source::ShardSpec;

pub(super) struct Reader {
    pub(super) cfg: Arc<LoaderConfig>,
    /// The reading settings ([`LoaderConfig::read_config`]).
    pub(super) read: ReadConfig,
    pub(super) shards: Arc<[ShardSpec]>,
    pub(super) http: Option<HttpFetcher>,
    pub(super) err_tx: async_channel::Sender<Result<Batch, LoaderError>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) progress: Arc<Progress>,
    pub(super) stats: Arc<LoaderStats>,
    /// Batches per epoch, when the shards' counts are known.
    pub(super) per_epoch: Option<u64>,
    /// `K`: the ordered map's window (the tail's reserve is `3 x K`, more than can be in flight).
    pub(super) bound: usize,
    /// The failed-shard policy (failed shards so far, how many are tolerated).
    pub(super) failures: RefCell<ShardFailures>,
}

/// A shard opened for streaming, or why it could not be.
type Opened = Result<ShardReader, String>;

/// Samples read from tar shards.
pub(super) struct TarFeed<'a> {
    r: &'a Reader,
    epoch: u64,
    list: Vec<usize>,
    current: Option<Current>,
    /// The next shard, opened early (HTTP) so that the download overlaps parsing.
    ahead: Option<(usize, Opened)>,
}

struct Current {
    shard: usize,
    pass: u32,
    name: Arc<str>,
    samples: ShardSamples,
    index: u64,
}

impl Feed for TarFeed<'_> {
    type Item = Box<Job>;

    fn start(&mut self, k: usize, pass: u32) -> Result<(), Halt> {
        let shard = self.list[k];
        let opened = match self.ahead.take() {
            Some((s, opened)) if s == shard => opened,
            _ => self.r.open(shard),
        };
        if let Some(&next) = self.list.get(k + 1)
            && self.r.shards[next].is_http()
        {
            self.ahead = Some((next, self.r.open(next)));
        }
        let spec = &self.r.shards[shard];
        self.current = None;
        self.r.stats.shards_opened.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(m::SHARDS_OPENED).increment(1);
        match opened {
            Ok(reader) => {
                let samples = ShardSamples::new(reader, spec, &self.r.read);
                self.current = Some(Current { shard, pass, name: spec.name().into(), samples, index: 0 });
                Ok(())
            }
            Err(e) => self.r.shard_failed(spec, &format!("cannot open: {e}")),
        }
    }

    fn next(&mut self) -> Result<Option<(Box<Job>, u64)>, Halt> {
        let Some(c) = self.current.as_mut() else { return Ok(None) };
        if self.r.stop.load(Ordering::Relaxed) {
            return Err(Halt::Stop);
        }
        let t = Instant::now();
        let spec = &self.r.shards[c.shard];
        let sample = match c.samples.next_item() {
            None => {
                self.current = None;
                return Ok(None);
            }
            Some(ShardItem::Failed(reason)) => {
                self.current = None;
                return self.r.shard_failed(spec, &reason).map(|()| None);
            }
            Some(ShardItem::Sample(sample)) => sample,
        };
        let (read, kept) = match &sample {
            Ok((s, read)) => (*read, s.fields.iter().map(|(_, b)| b.len() as u64).sum()),
            Err(_) => (0, 0),
        };
        let stats = &self.r.stats;
        stats.samples_read.fetch_add(1, Ordering::Relaxed);
        stats.bytes_read.fetch_add(read, Ordering::Relaxed);
        stats.read_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        ::metrics::counter!(m::SAMPLES_READ).increment(1);
        ::metrics::counter!(m::BYTES_READ).increment(read);
        let job = Box::new(Job {
            epoch: self.epoch,
            shard: c.shard as u32,
            index: c.index,
            pass: c.pass,
            shard_name: c.name.clone(),
            sample: sample.map(|(s, _)| s),
            capped: false,
        });
        c.index += 1;
        Ok(Some((job, kept)))
    }
}

impl Reader {
    pub(super) fn run(self, mut submit: Submitter<Work>, start: LoaderState) {
        let mut epoch = start.epoch;
        let mut ahead: Option<Stream<TarFeed>> = None;
        loop {
            if self.cfg.epochs.is_some_and(|n| epoch >= n) {
                return;
            }
            let at = if epoch == start.epoch { start.consumed } else { 0 };
            let done = if epoch == start.epoch { start.batch } else { 0 };
            let result = match ahead.take() {
                Some(s) => Ok(s),
                None => self.open_at(epoch, at, epoch == start.epoch && start.replay),
            }
            .and_then(|stream| match self.per_epoch {
                Some(per_epoch) => {
                    let needed = per_epoch.saturating_sub(done) * self.cfg.batch_size as u64;
                    self.stream_counted(epoch, stream, needed, &mut submit)
                }
                None => self.stream_all(epoch, stream, &mut submit).map(|()| None),
            });
            match result {
                Ok(next) => ahead = next,
                Err(Halt::Stop) => return,
                Err(Halt::NoData) => {
                    let _ = self.err_tx.send_blocking(Err(LoaderError::NoData { rank: self.cfg.rank, epoch }));
                    return;
                }
            }
            epoch += 1;
        }
    }

    /// Unknown length: the whole stream, then the end marker (the next epoch follows at once).
    fn stream_all(&self, epoch: u64, mut stream: Stream<TarFeed>, submit: &mut Submitter<Work>) -> Result<(), Halt> {
        while let Some(mut job) = stream.next()? {
            job.capped = stream.buffer.byte_capped;
            submit.submit(Work::Sample(job)).map_err(|_| Halt::Stop)?;
        }
        submit.submit(Work::EndOfEpoch { epoch }).map_err(|_| Halt::Stop)
    }

    /// Known length: exactly the samples the epoch can use (see the module docs). Returns the
    /// next epoch's stream, filled during the tail.
    fn stream_counted<'a>(
        &'a self,
        epoch: u64,
        stream: Stream<TarFeed<'a>>,
        needed: u64,
        submit: &mut Submitter<Work>,
    ) -> Result<Option<Stream<TarFeed<'a>>>, Halt> {
        let mut cur = Some(stream);
        let mut reserve: VecDeque<Box<Job>> = VecDeque::new();
        // Where the dropped stream stood (after the reserve), to reopen it if the reserve runs out.
        let (mut position, mut capped) = (0, false);
        let mut ahead: Option<Stream<TarFeed>> = None;
        let mut emitted = 0u64;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Halt::Stop);
            }
            let p = self.progress.get();
            if p.closed {
                return Err(Halt::Stop);
            }
            if p.epoch > epoch {
                return Ok(ahead);
            }
            if emitted < needed + p.bad {
                let job = match reserve.pop_front() {
                    Some(job) => job,
                    None => {
                        let c = match &mut cur {
                            Some(c) => c,
                            // More bad samples in the tail than the reserve held (rare).
                            None => cur.insert(self.open_at(epoch, position, capped)?),
                        };
                        pull(c)?
                    }
                };
                submit.submit(Work::Sample(job)).map_err(|_| Halt::Stop)?;
                emitted += 1;
                continue;
            }
            // The tail: everything the epoch can still use is in flight.
            if let Some(mut c) = cur.take() {
                for _ in 0..3 * self.bound {
                    reserve.push_back(pull(&mut c)?);
                }
                (position, capped) = (c.seq, c.buffer.byte_capped);
            }
            if ahead.is_none() && self.cfg.epochs.is_none_or(|n| epoch + 1 < n) {
                ahead = Some(self.open_at(epoch + 1, 0, false)?);
            }
            if let Some(a) = &mut ahead
                && a.prefill_one()?
            {
                continue;
            }
            self.progress.wait_change(p, Duration::from_millis(50));
        }
    }

    /// The shuffle buffer of `epoch`.
    fn buffer<T>(&self, epoch: u64) -> ShuffleBuffer<T> {
        let cfg = &self.cfg;
        let cap = cfg.shuffle_buffer.max(1);
        // No sample stays longer than `cap + samples per shard` reads: the buffer spans at most
        // `cap / samples_per_shard + 2` shards, which bounds what a resume reads.
        let counts: Option<Vec<u64>> = self.shards.iter().map(|s| s.samples).collect();
        let per_shard = counts.map_or(cap as u64, |c| c.iter().sum::<u64>().div_ceil(c.len().max(1) as u64));
        let seed = mix(&[cfg.seed, epoch, cfg.rank as u64, BUFFER_SALT]);
        ShuffleBuffer::new(cap, cfg.shuffle_buffer_bytes, cap as u64 + per_shard.max(1), seed)
    }

    fn list(&self, epoch: u64) -> Vec<usize> {
        let cfg = &self.cfg;
        super::epoch_shards(&self.shards, cfg.seed, epoch, cfg.rank, cfg.world_size)
    }

    /// The stream of `epoch`, `at` samples in. With the shards' counts, the position is
    /// computed from them and only the shards still in the shuffle buffer (and the one being
    /// read) are read; without counts, or when the byte cap shaped the order (`replay`), the
    /// epoch's reading is replayed from its start (tar parsing only, nothing decoded).
    fn open_at(&self, epoch: u64, at: u64, replay: bool) -> Result<Stream<TarFeed<'_>>, Halt> {
        let opened = self.stats.shards_opened.load(Ordering::Relaxed);
        let t = Instant::now();
        let stream = self.position(epoch, at, replay)?;
        if at > 0 {
            let read = self.stats.shards_opened.load(Ordering::Relaxed) - opened;
            self.stats.resume_shards_read.fetch_add(read, Ordering::Relaxed);
            ::metrics::counter!(m::RESUME_SHARDS_READ).increment(read);
            ::metrics::gauge!(m::RESUME_SECONDS).set(t.elapsed().as_secs_f64());
            let how = if stream.buffer.byte_capped || replay { "replayed" } else { "rebuilt from the counts" };
            tracing::info!("epoch {epoch}: position {at} {how}, {read} shard(s) read");
        }
        Ok(stream)
    }

    fn position(&self, epoch: u64, at: u64, replay: bool) -> Result<Stream<TarFeed<'_>>, Halt> {
        let list = self.list(epoch);
        let n = list.len();
        let wrap = self.per_epoch.is_some();
        let counts: Option<Vec<u64>> = list.iter().map(|&s| self.shards[s].samples).collect();
        let feed = TarFeed { r: self, epoch, list, current: None, ahead: None };
        let (Some(counts), false, true) = (counts, replay, at > 0) else {
            let mut stream = Stream::new(feed, n, wrap, self.buffer(epoch));
            for _ in 0..at {
                if stream.next()?.is_none() {
                    break;
                }
            }
            return Ok(stream);
        };
        let mut sim = Stream::new(CountFeed { counts, shard: 0, index: 0 }, n, wrap, self.buffer(epoch));
        for _ in 0..at {
            if sim.next()?.is_none() {
                break;
            }
        }
        // Which samples to fetch: those in the buffer, and the shard being read up to its position.
        let mut need: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for &(k, i) in sim.buffer.items() {
            need.entry(k).or_default().insert(i);
        }
        let current = sim.reading.then_some((sim.feed.shard, sim.feed.index));
        let mut feed = feed;
        let mut got: HashMap<Placeholder, Box<Job>> = HashMap::new();
        let mut fetch = |feed: &mut TarFeed, k: usize, upto: u64| -> Result<(), Halt> {
            feed.start(k, sim.pass)?;
            let wanted = need.get(&k);
            while feed.current.as_ref().is_some_and(|c| c.index < upto) {
                let Some((job, _)) = feed.next()? else { break };
                if wanted.is_some_and(|w| w.contains(&job.index)) {
                    got.insert((k, job.index), job);
                }
            }
            Ok(())
        };
        for (&k, wanted) in &need {
            if current.is_none_or(|(c, _)| c != k) {
                fetch(&mut feed, k, wanted.last().map_or(0, |i| i + 1))?;
            }
        }
        feed.current = None;
        if let Some((k, index)) = current {
            fetch(&mut feed, k, index)?; // left open at `index`: reading goes on from there
        }
        let pass = sim.pass;
        let shard_of: Vec<usize> = feed.list.clone();
        Ok(sim.replace_feed(feed, |p| match got.remove(&p) {
            Some(job) => {
                let bytes = job.sample.as_ref().map_or(0, |s| s.fields.iter().map(|(_, b)| b.len() as u64).sum());
                (job, bytes)
            }
            None => {
                let shard = shard_of[p.0];
                let job = Job {
                    epoch,
                    shard: shard as u32,
                    index: p.1,
                    pass,
                    shard_name: self.shards[shard].name().into(),
                    sample: Err(BrokenSample {
                        kind: "format",
                        key: "?".into(),
                        message: format!("sample {} is missing on resume (short shard)", p.1),
                    }),
                    capped: false,
                };
                (Box::new(job), 0)
            }
        }))
    }

    /// Counts a failed shard (open error, broken tar, fewer samples than its manifest says) and
    /// stops the run once more distinct shards have failed than `max_failed_shards` allows.
    fn shard_failed(&self, spec: &ShardSpec, reason: &str) -> Result<(), Halt> {
        self.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
        self.failures.borrow_mut().fail(spec, reason).map_err(|e| {
            let _ = self.err_tx.send_blocking(Err(LoaderError::from(e)));
            Halt::Stop
        })
    }

    fn open(&self, shard: usize) -> Opened {
        open_shard(&self.shards[shard], self.http.as_ref())
    }
}

/// The next sample of a wrapping stream, marked when the byte cap shaped the order so far.
fn pull(stream: &mut Stream<TarFeed>) -> Result<Box<Job>, Halt> {
    let mut job = stream.next()?.ok_or(Halt::NoData)?;
    job.capped = stream.buffer.byte_capped;
    Ok(job)
}
