//! Containing panics. Decoders and parsers (ours, zune-jpeg, the `image` crate, webdataset-rs,
//! burn's record reader) should never panic on hostile bytes, but one that does must cost a
//! sample or a shard, not the run: the loader's workers, the shard reader, the sharder and the
//! trainer's checkpoint reader run untrusted input through [`catch_panic`]. The default panic hook
//! still prints each caught panic to stderr (a bug worth reporting); the callers log it too.

/// Runs `f`, turning a panic into `Err(panic message)`. Whatever `f` was mutating may be left
/// half-done: callers drop or reset it.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-text panic payload".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_panic_returns_the_message() {
        assert_eq!(catch_panic(|| 5), Ok(5));
        let n = 3;
        assert_eq!(catch_panic(|| -> u8 { panic!("row {n} out of range") }), Err("row 3 out of range".to_string()));
        assert_eq!(catch_panic(|| -> u8 { panic!("static text") }), Err("static text".to_string()));
        assert_eq!(catch_panic(|| -> u8 { std::panic::panic_any(1.5f32) }), Err("non-text panic payload".to_string()));
    }
}
