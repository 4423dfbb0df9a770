//! Helpers of the mutation-fuzz tests (`decode`, `wds`): a seeded generator, the case count, and
//! the failure report that saves the first failing input for replay.

/// A xorshift64 generator: `next(n)` is uniform-ish in `0..n` (`0` when `n` is 0).
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// Cases to run: the environment variable `var` (a long local run) or `default`.
pub fn cases(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The files ending in `.ext` in the directory named by the environment variable `var`, if set.
pub fn seed_files(var: &str, ext: &str) -> Vec<Vec<u8>> {
    let Some(dir) = std::env::var_os(var) else { return Vec::new() };
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == ext)).collect())
        .unwrap_or_default();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Fails the test if any case failed, saving the first failing input as `cae-<what>-<case>.<ext>`
/// in the temp directory.
pub fn report(failures: &[(usize, Vec<u8>)], cases: usize, what: &str, ext: &str) {
    if let Some((case, bytes)) = failures.first() {
        let path = std::env::temp_dir().join(format!("cae-{what}-{case}.{ext}"));
        let _ = std::fs::write(&path, bytes);
        panic!(
            "{} of {cases} mutated inputs ({what}) panicked; the first (case {case}) is saved at {}",
            failures.len(),
            path.display()
        );
    }
}
