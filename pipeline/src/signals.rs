//! Stopping a long command cleanly on SIGINT, SIGTERM or SIGHUP (`trainer run`, `sharder build`).
//!
//! The first signal sets a stop flag that the command polls at a safe point (the trainer after
//! its step and checkpoint, the sharder after a file, keeping its complete shards) and records
//! the signal's number; the command then exits with 128 + N, as a shell reports a death by
//! signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP). A second signal while the flag is set exits
//! at once with 128 + its number.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::flag;

/// Installs the handlers: each of SIGINT, SIGTERM and SIGHUP sets `stop` and stores its number
/// in `signal`; one arriving while `stop` is already set exits the process with 128 + N.
pub fn install(stop: &Arc<AtomicBool>, signal: &Arc<AtomicUsize>) -> std::io::Result<()> {
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Registered first: it sees the flag as the previous signal left it.
        flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(stop))?;
        flag::register_usize(sig, Arc::clone(signal), sig as usize)?;
        flag::register(sig, Arc::clone(stop))?;
    }
    Ok(())
}

/// `SIGINT`, `SIGTERM`, `SIGHUP`, or `signal N`.
pub fn name(signal: usize) -> String {
    match i32::try_from(signal) {
        Ok(SIGINT) => "SIGINT".into(),
        Ok(SIGTERM) => "SIGTERM".into(),
        Ok(SIGHUP) => "SIGHUP".into(),
        _ => format!("signal {signal}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::name(2), "SIGINT");
        assert_eq!(super::name(15), "SIGTERM");
        assert_eq!(super::name(1), "SIGHUP");
        assert_eq!(super::name(10), "signal 10");
    }
}
