//! The build plan: everything that determines a build's bytes, as one digest (what `--resume`
//! compares) and as readable parts (what it names when the digest differs).

use std::collections::BTreeMap;

use super::*;

/// The readable parts of a plan: each option by its flag, and the listed input summarised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PlanParts {
    /// Flag (`--seed`) or `sharder version` -> value as given.
    pub(super) options: BTreeMap<String, String>,
    pub(super) classes: u64,
    pub(super) classes_sha256: String,
    pub(super) files: u64,
    /// Digest of every input file's path, class, key, size and modification time.
    pub(super) files_sha256: String,
}

/// A plan: the digest that identifies it and its parts.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) digest: String,
    pub(super) parts: PlanParts,
}

/// Digest of everything that determines the output, so `--resume` refuses a changed run.
/// Each input file's size and modification time are part of it (a file replaced in place
/// changes the plan), and so is the tool's version (another version may write other bytes).
pub(super) fn plan(opts: &BuildOptions, listing: &InputListing) -> Plan {
    let validate = format!("{:?}", opts.validate).to_lowercase();
    let max_side = opts.max_side.map_or_else(|| "none".to_string(), |m| m.to_string());
    let options: BTreeMap<String, String> = [
        ("sharder version", env!("CARGO_PKG_VERSION").to_string()),
        ("--seed", opts.seed.to_string()),
        ("--shard-max-samples", opts.shard_max_samples.to_string()),
        ("--shard-max-bytes", opts.shard_max_bytes.to_string()),
        ("--prefix", opts.prefix.clone()),
        ("--validate", validate),
        ("--max-side", max_side),
        ("--max-file-bytes", opts.max_file_bytes.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // The digest hashes the same text as before the parts existed, so a journal of an earlier
    // build of this version still resumes.
    let mut all = Sha256::new();
    all.update(format!(
        "v2 sharder={} seed={} max_samples={} max_bytes={} prefix={} validate={:?} max_side={:?} max_file_bytes={}\n",
        env!("CARGO_PKG_VERSION"),
        opts.seed,
        opts.shard_max_samples,
        opts.shard_max_bytes,
        opts.prefix,
        opts.validate,
        opts.max_side,
        opts.max_file_bytes
    ));
    let mut classes = Sha256::new();
    for c in &listing.classes {
        let line = format!("class {c}\n");
        all.update(&line);
        classes.update(&line);
    }
    let mut files = Sha256::new();
    for f in &listing.files {
        let stat = match fs::metadata(&f.path) {
            Ok(m) => {
                let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                format!("{} {}", m.len(), mtime.map_or(0, |d| d.as_nanos()))
            }
            Err(e) => format!("unreadable {:?}", e.kind()),
        };
        let line = format!("file {}\t{:?}\t{}\t{stat}\n", f.rel_path, f.class_index, f.key);
        all.update(&line);
        files.update(&line);
    }
    let parts = PlanParts {
        options,
        classes: listing.classes.len() as u64,
        classes_sha256: hex::encode(classes.finalize()),
        files: listing.files.len() as u64,
        files_sha256: hex::encode(files.finalize()),
    };
    Plan { digest: hex::encode(all.finalize()), parts }
}

/// What differs between the plan of an earlier run (`then`) and this one, one phrase each:
/// `--seed was 0, now 5`; the class list; the input files.
pub(super) fn differences(then: &PlanParts, now: &PlanParts) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = then.options.keys().chain(now.options.keys()).collect();
    for k in keys {
        let (a, b) = (then.options.get(k), now.options.get(k));
        if a != b {
            let show = |v: Option<&String>| v.map_or_else(|| "not recorded".to_string(), |v| v.clone());
            out.push(format!("{k} was {}, now {}", show(a), show(b)));
        }
    }
    if then.classes_sha256 != now.classes_sha256 {
        out.push(format!("the class list changed ({} classes then, {} now)", then.classes, now.classes));
    }
    if then.files_sha256 != now.files_sha256 {
        out.push(format!(
            "the input files changed ({} files then, {} now: added, removed, renamed or modified in place)",
            then.files, now.files
        ));
    }
    out
}

/// The refusal's message: what changed, when the earlier run recorded its parts.
pub(super) fn changed_message(what: &str, then: Option<&PlanParts>, now: &PlanParts, remedy: &str) -> String {
    let diff = then.map(|t| differences(t, now)).unwrap_or_default();
    if diff.is_empty() {
        // An earlier version recorded only the digest (or the difference is not in the parts).
        format!("{what} with other input or options ({remedy})")
    } else {
        format!("{what} with other input or options: {} ({remedy})", diff.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path, names: &[&str]) -> InputListing {
        for n in names {
            let p = dir.join("c").join(n);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, n.as_bytes()).unwrap();
        }
        input::walk_class_folders(dir).unwrap()
    }

    #[test]
    fn a_changed_option_is_named_with_both_values() {
        let d = tempfile::tempdir().unwrap();
        let l = listing(d.path(), &["a.JPEG"]);
        let opts = BuildOptions::new(d.path(), d.path().join("out"));
        let mut other = opts.clone();
        other.seed = 5;
        other.max_side = Some(256);
        let (a, b) = (plan(&opts, &l), plan(&other, &l));
        assert_ne!(a.digest, b.digest);
        assert_eq!(differences(&a.parts, &b.parts), vec!["--max-side was none, now 256", "--seed was 0, now 5"]);
        assert!(differences(&a.parts, &plan(&opts, &l).parts).is_empty());
    }

    #[test]
    fn changed_input_files_and_classes_are_named() {
        let d = tempfile::tempdir().unwrap();
        let opts = BuildOptions::new(d.path(), d.path().join("out"));
        let before = plan(&opts, &listing(d.path(), &["a.JPEG"]));
        let after = plan(&opts, &listing(d.path(), &["b.JPEG"]));
        let diff = differences(&before.parts, &after.parts);
        assert_eq!(diff.len(), 1, "{diff:?}");
        assert!(diff[0].contains("input files changed (1 files then, 2 now"), "{diff:?}");
        fs::create_dir_all(d.path().join("d")).unwrap();
        fs::write(d.path().join("d").join("x.JPEG"), b"x").unwrap();
        let more = plan(&opts, &input::walk_class_folders(d.path()).unwrap());
        assert!(differences(&after.parts, &more.parts).iter().any(|m| m.contains("class list changed")));
        let msg = changed_message("the interrupted run was made", None, &more.parts, "use --force");
        assert_eq!(msg, "the interrupted run was made with other input or options (use --force)");
    }
}
