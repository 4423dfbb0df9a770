//! TLS trust roots, found by `rustls-native-certs` (the variables and bundle paths OpenSSL
//! uses): with `SSL_CERT_FILE` / `SSL_CERT_DIR` set (a private CA), exactly what they name is
//! trusted; otherwise the system's CA store plus the compiled-in Mozilla roots (webpki-roots).

/// The roots to give the HTTP client.
pub(super) struct Roots {
    pub(super) certs: Vec<reqwest::Certificate>,
    /// Whether the compiled-in roots are trusted too (not when the environment names the roots).
    pub(super) built_in: bool,
}

/// Loads the roots. When `SSL_CERT_FILE`/`SSL_CERT_DIR` are set but give no usable certificate,
/// that is an error naming what was wrong (a typo there would otherwise fail every shard later).
pub(super) fn load() -> Result<Roots, String> {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let named = set("SSL_CERT_FILE") || set("SSL_CERT_DIR");
    let found = rustls_native_certs::load_native_certs();
    let mut certs = Vec::with_capacity(found.certs.len());
    for der in &found.certs {
        match reqwest::Certificate::from_der(der.as_ref()) {
            Ok(c) => certs.push(c),
            Err(e) => tracing::debug!("TLS roots: a certificate skipped: {e}"),
        }
    }
    for e in &found.errors {
        tracing::debug!("TLS roots: {e}");
    }
    if named && certs.is_empty() {
        let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        let why = if why.is_empty() { "no PEM certificates".to_string() } else { why.join("; ") };
        return Err(format!("no usable certificate in SSL_CERT_FILE/SSL_CERT_DIR: {why}"));
    }
    Ok(Roots { certs, built_in: !named })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `SSL_CERT_FILE`/`SSL_CERT_DIR` (as in CI) loading never fails and keeps the
    /// built-in roots; the system store adds its certificates where the machine has one.
    /// (`SSL_CERT_FILE` with a private CA is tested end to end: `tests/https_private_ca.rs`.)
    #[test]
    fn without_the_variables_the_system_store_and_built_in_roots_are_used() {
        if std::env::var_os("SSL_CERT_FILE").is_some() || std::env::var_os("SSL_CERT_DIR").is_some() {
            eprintln!("SSL_CERT_FILE/SSL_CERT_DIR set in this environment; covered by the end-to-end test");
            return;
        }
        let roots = load().expect("system roots");
        assert!(roots.built_in);
        if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").is_file() {
            assert!(!roots.certs.is_empty(), "the Debian bundle holds certificates");
        }
    }
}
