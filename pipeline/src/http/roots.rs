//! TLS trust roots: `SSL_CERT_FILE` / `SSL_CERT_DIR` when set (a private CA), else the system's
//! CA bundle, plus the compiled-in Mozilla roots (webpki-roots) unless `SSL_CERT_FILE` or
//! `SSL_CERT_DIR` says exactly what to trust.
//!
//! This is what `rustls-native-certs` does on Linux (the same variables and bundle paths as
//! OpenSSL); that crate is not available to this build, so the few lines are here.

use std::path::{Path, PathBuf};

/// CA bundles of the common Linux distributions and BSDs (openssl-probe's list).
const SYSTEM_BUNDLES: [&str; 7] = [
    "/etc/ssl/certs/ca-certificates.crt",                // Debian, Ubuntu, Gentoo, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",                  // Fedora, RHEL 6
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", // RHEL 7+, CentOS
    "/etc/ssl/ca-bundle.pem",                            // openSUSE
    "/etc/ssl/cert.pem",                                 // Alpine, macOS, OpenBSD
    "/usr/local/share/certs/ca-root-nss.crt",            // FreeBSD
    "/etc/pki/tls/cacert.pem",                           // OpenELEC
];

/// Where the roots come from, and whether the compiled-in ones are added too.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RootSource {
    pub(super) files: Vec<PathBuf>,
    pub(super) built_in: bool,
}

/// Picks the root files from the environment (`var` looks a variable up).
pub(super) fn source(var: impl Fn(&str) -> Option<String>) -> RootSource {
    let mut files = Vec::new();
    if let Some(f) = var("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = var("SSL_CERT_DIR").filter(|v| !v.is_empty()) {
        for dir in std::env::split_paths(&d) {
            let mut certs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
                .unwrap_or_default();
            certs.sort();
            files.extend(certs);
        }
    }
    if !files.is_empty() {
        return RootSource { files, built_in: false };
    }
    let system = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.is_file());
    RootSource { files: system.into_iter().map(Path::to_path_buf).collect(), built_in: true }
}

/// Parses the PEM certificates of `files`, skipping those that cannot be read or hold none. When
/// `SSL_CERT_FILE`/`SSL_CERT_DIR` give no certificate at all, that is an error (naming them).
pub(super) fn load(src: &RootSource) -> Result<Vec<reqwest::Certificate>, String> {
    let mut out = Vec::new();
    for f in &src.files {
        let certs = std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|pem| reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string()));
        match certs {
            Ok(c) if !c.is_empty() => out.extend(c),
            Ok(_) | Err(_) if src.built_in => {} // a system bundle we could not use: built-in roots remain
            Ok(_) => tracing::debug!("{}: no PEM certificates", f.display()),
            Err(e) => tracing::debug!("{}: {e}", f.display()),
        }
    }
    if out.is_empty() && !src.built_in {
        let names: Vec<String> = src.files.iter().map(|f| f.display().to_string()).collect();
        return Err(format!("no PEM certificates in SSL_CERT_FILE/SSL_CERT_DIR ({})", names.join(", ")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_cert_file_replaces_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let vars = |f: &Path| {
            let f = f.display().to_string();
            move |k: &str| (k == "SSL_CERT_FILE").then(|| f.clone())
        };
        let src = source(vars(&ca));
        assert_eq!(src, RootSource { files: vec![ca.clone()], built_in: false });
        // Missing, or not PEM: a clear error naming the file.
        let e = load(&src).unwrap_err();
        assert!(e.contains("ca.pem"), "{e}");
        std::fs::write(&ca, "not a certificate").unwrap();
        assert!(load(&src).is_err());
        // SSL_CERT_DIR: every file in it.
        std::fs::write(dir.path().join("b.pem"), "x").unwrap();
        let d = dir.path().display().to_string();
        let src = source(|k: &str| (k == "SSL_CERT_DIR").then(|| d.clone()));
        assert_eq!(src.files, vec![dir.path().join("b.pem"), ca.clone()]);
        assert!(!src.built_in);
        // Nothing set: the system bundle (if any) plus the built-in roots; never an error.
        let src = source(|_: &str| None);
        assert!(src.built_in && src.files.len() <= 1);
        assert!(load(&src).is_ok());
    }

    /// A real certificate parses (the system bundle, where the machine has one).
    #[test]
    fn the_system_bundle_loads_when_present() {
        let src = source(|_: &str| None);
        let Some(f) = src.files.first() else {
            eprintln!("no system CA bundle on this machine; skipped");
            return;
        };
        let certs = load(&RootSource { files: vec![f.clone()], built_in: false }).unwrap();
        assert!(!certs.is_empty(), "{}", f.display());
    }
}
