//! The ordered shard writer of `sharder build`: takes validated samples in shuffled order, cuts
//! shards by count and size, and completes each in the background (fsync, rename, directory
//! sync, journal line) while the next one is written.

use super::*;

pub(super) struct OpenShard {
    name: String,
    tmp: PathBuf,
    writer: ShardWriter,
    /// Estimated tar size so far (headers + padded payloads).
    size: u64,
}

pub(super) struct OrderedWriter<'a> {
    pub(super) opts: &'a BuildOptions,
    pub(super) journal_path: PathBuf,
    pub(super) shard_index: u64,
    pub(super) current: Option<OpenShard>,
    pub(super) done: Vec<Done>,
    pub(super) pending_rejected: Vec<(String, String)>,
    pub(super) pending_converted: u64,
    /// Rejections warned about one by one so far (then summarised per shard).
    pub(super) warned: u64,
    pub(super) crash_after: Option<u64>,
    pub(super) hang_after: Option<u64>,
    pub(super) completed_here: u64,
    pub(super) finisher: Finisher,
}

/// A shard whose bytes are written and flushed, waiting for fsync, rename and its journal line.
struct FinishJob {
    file: fs::File,
    tmp: PathBuf,
    final_path: PathBuf,
    journal_line: String,
}

/// Completes shards in the background and in order: fsync, rename, directory sync, journal line.
/// The writer goes on with the next shard meanwhile, so the disk's flush latency overlaps with
/// reading and validating instead of stalling the run.
pub(super) struct Finisher {
    tx: Option<crossbeam_channel::Sender<FinishJob>>,
    handle: Option<std::thread::JoinHandle<Result<(), ShardError>>>,
    submitted: u64,
    completed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Finisher {
    pub(super) fn start(journal_path: PathBuf) -> Result<Self, ShardError> {
        let (tx, rx) = crossbeam_channel::unbounded::<FinishJob>();
        let completed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = completed.clone();
        let handle = std::thread::Builder::new()
            .name("sharder-finisher".into())
            .spawn(move || -> Result<(), ShardError> {
                for job in rx {
                    job.file.sync_all().map_err(|e| ShardError::write(&job.tmp, e))?;
                    drop(job.file);
                    fs::rename(&job.tmp, &job.final_path).map_err(|e| ShardError::write(&job.final_path, e))?;
                    sync_dir(&job.final_path);
                    // The journal line comes after the rename: a journaled shard is always whole.
                    let mut f = fs::OpenOptions::new()
                        .append(true)
                        .open(&journal_path)
                        .map_err(|e| ShardError::write(&journal_path, e))?;
                    f.write_all(job.journal_line.as_bytes()).map_err(|e| ShardError::write(&journal_path, e))?;
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(())
            })
            .map_err(|e| ShardError::Internal(format!("cannot start the finisher thread: {e}")))?;
        Ok(Self { tx: Some(tx), handle: Some(handle), submitted: 0, completed })
    }

    fn submit(&mut self, job: FinishJob) -> Result<(), ShardError> {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            return self.close(); // the finisher stopped on an error: report it
        }
        self.submitted += 1;
        Ok(())
    }

    /// Waits until every submitted shard is complete.
    fn wait_idle(&mut self) -> Result<(), ShardError> {
        while self.completed.load(std::sync::atomic::Ordering::SeqCst) < self.submitted {
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                return self.close();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Finishes the queue and reports the first error.
    fn close(&mut self) -> Result<(), ShardError> {
        self.tx.take();
        match self.handle.take().map(|h| h.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(ShardError::Internal("the finisher thread panicked".into())),
        }
    }
}

fn tar_size(payload: usize) -> u64 {
    512 + payload.div_ceil(512) as u64 * 512
}

impl OrderedWriter<'_> {
    /// Takes the next outcome in shuffled order; `input_pos` = inputs consumed after this one.
    pub(super) fn accept(&mut self, out: Outcome, input_pos: u64) -> Result<(), ShardError> {
        match out {
            Outcome::Rejected { rel_path, reason } => {
                self.warned += 1;
                if self.warned <= WARN_EACH {
                    tracing::warn!("rejected {rel_path}: {reason}");
                } else if self.warned == WARN_EACH + 1 {
                    tracing::warn!(
                        "more rejections: from now on summarised per shard (every one is in {REJECTED_FILE})"
                    );
                }
                self.pending_rejected.push((rel_path, reason));
                Ok(())
            }
            Outcome::Sample(p) => self.write(&p, input_pos),
        }
    }

    fn write(&mut self, p: &Prepared, input_pos: u64) -> Result<(), ShardError> {
        let cls = p.class_index.to_string();
        let json = p.meta_json();
        let size = tar_size(p.jpg.len()) + tar_size(cls.len()) + tar_size(json.len());
        if let Some(cur) = &self.current
            && (cur.writer.samples() >= self.opts.shard_max_samples || cur.size + size > self.opts.shard_max_bytes)
            && cur.writer.samples() > 0
        {
            // This sample starts the next shard: the current one ends with the previous input.
            self.close_shard(input_pos - 1)?;
        }
        if self.current.is_none() {
            let name = format!("{}-{:06}.tar", self.opts.prefix, self.shard_index);
            let tmp = tmp_path(&self.opts.output.join(&name));
            let writer = ShardWriter::create(&tmp).map_err(|source| ShardError::Shard { path: tmp.clone(), source })?;
            self.current = Some(OpenShard { name, tmp, writer, size: 1024 });
        }
        let cur = self.current.as_mut().ok_or_else(|| ShardError::Internal("no open shard".into()))?;
        let fields: [(&str, &[u8]); 3] = [(CLASS_EXT, cls.as_bytes()), (IMAGE_EXT, &p.jpg), (META_EXT, &json)];
        cur.writer
            .write_sample(&p.key, &fields)
            .map_err(|source| ShardError::Shard { path: cur.tmp.clone(), source })?;
        cur.size += size;
        if p.meta.action != crate::process::Action::Kept {
            self.pending_converted += 1;
        }
        let crash = self.crash_after.is_some_and(|n| self.completed_here >= n);
        let hang = self.hang_after.is_some_and(|n| self.completed_here >= n);
        if crash || hang {
            // Let the completed shards land first, so the test sees a known state.
            self.finisher.wait_idle()?;
        }
        if crash {
            // Crash test: die in the middle of a shard, as kill -9 would.
            tracing::error!("{CRASH_ENV} reached: aborting");
            std::process::abort();
        }
        if hang {
            eprintln!("sharder: paused");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Ok(())
    }

    /// Completes the open shard (if any): finish, fsync, rename, journal. `next_input` is the
    /// number of shuffled inputs fully accounted for by the shards up to this one.
    pub(super) fn close_shard(&mut self, next_input: u64) -> Result<(), ShardError> {
        let Some(cur) = self.current.take() else { return Ok(()) };
        let (digest, file) =
            cur.writer.finish_unsynced().map_err(|source| ShardError::Shard { path: cur.tmp.clone(), source })?;
        let entry = ShardEntry { name: cur.name, digest };
        let rejected = std::mem::take(&mut self.pending_rejected);
        let converted = std::mem::take(&mut self.pending_converted);
        if self.warned > WARN_EACH && !rejected.is_empty() {
            let (path, reason) = &rejected[0];
            tracing::warn!("{}: {} inputs rejected (first: {path}: {reason})", entry.name, rejected.len());
        }
        let line = JournalLine::Shard { shard: entry.clone(), next_input, converted, rejected: rejected.clone() };
        let mut journal_line = serde_json::to_string(&line).unwrap_or_default();
        journal_line.push('\n');
        let final_path = self.opts.output.join(&entry.name);
        self.finisher.submit(FinishJob { file, tmp: cur.tmp, final_path, journal_line })?;
        tracing::debug!("handed {} to the finisher", entry.name);
        self.done.push((entry, next_input, converted, rejected));
        self.shard_index += 1;
        self.completed_here += 1;
        Ok(())
    }

    /// Test hook ([`PAUSE_ENV`]): lets the completed shards land, says `sharder: paused` on
    /// stderr and waits until the build is told to stop (forever without a stop flag).
    pub(super) fn pause_until_stopped(&mut self) -> Result<(), ShardError> {
        self.finisher.wait_idle()?;
        eprintln!("sharder: paused");
        while !self.opts.stop_requested() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops early: drops the shard in progress (its temporary file) and waits until every
    /// completed shard is renamed and journaled, so `--resume` continues right after them.
    pub(super) fn abandon(mut self) -> Result<(), ShardError> {
        if let Some(cur) = self.current.take() {
            drop(cur.writer);
            fs::remove_file(&cur.tmp).map_err(|e| ShardError::write(&cur.tmp, e))?;
            tracing::debug!("dropped the unfinished {}", cur.name);
        }
        self.finisher.close()
    }

    /// Writes classes.txt, rejected.tsv and finally manifest.json; removes the journal.
    pub(super) fn finish(mut self, listing: &InputListing, input_files: u64) -> Result<Manifest, ShardError> {
        self.finisher.close()?;
        let out = &self.opts.output;
        let mut rejected: Vec<(String, String)> = Vec::new();
        let mut converted = 0;
        let mut shards = Vec::new();
        for (entry, _, c, r) in &self.done {
            shards.push(entry.clone());
            converted += c;
            rejected.extend(r.iter().cloned());
        }
        rejected.extend(self.pending_rejected.iter().cloned());
        converted += self.pending_converted;
        let mut classes = listing.classes.join("\n");
        classes.push('\n');
        write_atomic(&out.join(CLASSES_FILE), classes.as_bytes())?;
        let mut tsv = String::from("path\treason\n");
        for (p, r) in &rejected {
            tsv.push_str(&format!("{p}\t{}\n", r.replace(['\t', '\n'], " ")));
        }
        write_atomic(&out.join(REJECTED_FILE), tsv.as_bytes())?;
        if self.opts.strict && !rejected.is_empty() {
            // No manifest: the shards are not a finished data set. The journal stays, so a
            // build without --strict (--resume) can still finish it.
            return Err(ShardError::Strict(rejected.len() as u64));
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            prefix: self.opts.prefix.clone(),
            seed: self.opts.seed,
            classes: listing.classes.clone(),
            input_files,
            total_samples: shards.iter().map(|s| s.digest.samples).sum(),
            total_bytes: shards.iter().map(|s| s.digest.bytes).sum(),
            converted,
            rejected: rejected.len() as u64,
            shards,
        };
        if manifest.total_samples + manifest.rejected != input_files {
            return Err(ShardError::Internal(format!(
                "count identity broken: {} sharded + {} rejected != {} input files",
                manifest.total_samples, manifest.rejected, input_files
            )));
        }
        let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| ShardError::Internal(e.to_string()))?;
        json.push(b'\n');
        // The plan file keeps the journal's header line: a later --resume recognises the build
        // by it, or names what changed.
        let journal = fs::read_to_string(&self.journal_path).unwrap_or_default();
        if let Some(header) = journal.lines().next()
            && let Ok(JournalLine::Header { .. }) = serde_json::from_str::<JournalLine>(header)
        {
            write_atomic(&out.join(PLAN_FILE), format!("{header}\n").as_bytes())?;
        }
        write_atomic(&out.join(MANIFEST_FILE), &json)?;
        fs::remove_file(&self.journal_path).map_err(|e| ShardError::write(&self.journal_path, e))?;
        Ok(manifest)
    }
}
