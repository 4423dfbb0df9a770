//! The resume journal (`.sharder-journal.jsonl`): a header line with the plan, then one line
//! per completed shard, appended only after the shard is renamed into place, so every journaled
//! shard is whole; a torn last line (killed while appending) ends it.

use super::*;

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum JournalLine {
    Header {
        plan: String,
        /// Absent in journals of earlier versions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parts: Option<PlanParts>,
    },
    Shard {
        shard: ShardEntry,
        next_input: u64,
        converted: u64,
        rejected: Vec<(String, String)>,
    },
}

pub(super) type Done = (ShardEntry, u64, u64, Vec<(String, String)>);

/// What the journaled shards `done` hold.
pub(super) fn kept_counts(done: &[Done]) -> Counts {
    Counts {
        input_files: done.last().map_or(0, |d| d.1),
        samples: done.iter().map(|d| d.0.digest.samples).sum(),
        shards: done.len() as u64,
        converted: done.iter().map(|d| d.2).sum(),
        rejected: done.iter().map(|d| d.3.len() as u64).sum(),
    }
}

/// Shards listed in the journal of `dir` (unchecked; 0 without a journal).
pub(crate) fn journaled_shards(dir: &Path) -> u64 {
    let text = fs::read_to_string(dir.join(JOURNAL_FILE)).unwrap_or_default();
    let shard = |l: &str| matches!(serde_json::from_str::<JournalLine>(l), Ok(JournalLine::Shard { .. }));
    text.lines().filter(|l| shard(l)).count() as u64
}

pub(super) fn read_journal(path: &Path, plan: &Plan, opts: &BuildOptions) -> Result<Vec<Done>, ShardError> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(Vec::new()); // nothing journaled: start over
    };
    let resume_err = |message: String| ShardError::Resume { path: path.to_path_buf(), message };
    let mut done = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // A torn last line (killed while appending) ends the journal.
        let Ok(parsed) = serde_json::from_str::<JournalLine>(line) else { break };
        match parsed {
            JournalLine::Header { plan: p, parts } => {
                if i != 0 || p != plan.digest {
                    let what = "the interrupted run was made";
                    let remedy = "give the same options to resume, or use --force to start over";
                    return Err(resume_err(plan::changed_message(what, parts.as_ref(), &plan.parts, remedy)));
                }
            }
            JournalLine::Shard { shard, next_input, converted, rejected } => {
                if i == 0 {
                    return Err(resume_err("journal has no header".into()));
                }
                if let Err(reason) = cae_pipeline::manifest::check_shard_name(&shard.name) {
                    return Err(resume_err(format!(
                        "journal line {}: shard name {:?} refused: {reason}",
                        i + 1,
                        shard.name
                    )));
                }
                // Checking every shard can take a while: a signal stops here, journal untouched.
                if opts.stop_requested() {
                    return Err(opts.stopped());
                }
                // Keep a journaled shard only if the file is there, whole and unchanged.
                let file = opts.output.join(&shard.name);
                match sha256_file(&file) {
                    Ok((bytes, sha)) if bytes == shard.digest.bytes && sha == shard.digest.sha256 => {
                        done.push((shard, next_input, converted, rejected));
                    }
                    _ => {
                        tracing::warn!("{}: missing or changed, rebuilding from here", file.display());
                        break;
                    }
                }
            }
        }
    }
    Ok(done)
}

pub(super) fn rewrite_journal(path: &Path, plan: &Plan, done: &[Done]) -> Result<(), ShardError> {
    let header = JournalLine::Header { plan: plan.digest.clone(), parts: Some(plan.parts.clone()) };
    let mut text = serde_json::to_string(&header).unwrap_or_default();
    text.push('\n');
    for (shard, next_input, converted, rejected) in done {
        let line = JournalLine::Shard {
            shard: shard.clone(),
            next_input: *next_input,
            converted: *converted,
            rejected: rejected.clone(),
        };
        text.push_str(&serde_json::to_string(&line).unwrap_or_default());
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}
