//! HTTPS shards behind a private CA, end to end through the `pipeline` binary (issue 16): the
//! trust roots were compiled in only, so a company's internal object store could not be read.
//! Now `SSL_CERT_FILE` names the roots (rustls-native-certs); a certificate nothing trusts fails
//! the shard at once, naming the way out, instead of being retried for minutes.
//!
//! The CA and the server's certificate are made at test time (rcgen); the server is rustls on
//! 127.0.0.1, answering every GET with the shard.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cae_pipeline::wds::ShardWriter;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

fn jpeg(w: u16, h: u16, seed: u8) -> Vec<u8> {
    let rgb: Vec<u8> =
        (0..w as usize * h as usize * 3).map(|i| (i as u8).wrapping_mul(seed) ^ (i / 61) as u8).collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

/// A private CA (its PEM) and a rustls server config for `localhost` signed by it.
fn private_ca() -> (String, Arc<rustls::ServerConfig>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "cae test private CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (ca.pem(), Arc::new(cfg))
}

/// Serves `body` over TLS on 127.0.0.1 to every request, one thread per connection; returns the
/// port.
fn serve_tls(cfg: Arc<rustls::ServerConfig>, body: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (cfg, body) = (cfg.clone(), body.clone());
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(20)));
                let Ok(conn) = rustls::ServerConnection::new(cfg) else { return };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                // The request head (a failed handshake ends here: the client hung up).
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/x-tar\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(&body);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

fn shard_bytes(dir: &Path) -> Vec<u8> {
    let path = dir.join("shard.tar");
    let mut w = ShardWriter::create(&path).unwrap();
    for i in 0..6u8 {
        w.write_sample(&format!("s{i}"), &[("cls", b"1"), ("jpg", &jpeg(96, 80, 2 * i + 1))]).unwrap();
    }
    w.finish().unwrap();
    std::fs::read(&path).unwrap()
}

fn preview(url: &str, out: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.args(["preview", "--workers", "1", "--shuffle-buffer", "1", "--n", "2", "--shards", url, "--out"])
        .arg(out)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn shards_behind_a_private_ca_load_with_ssl_cert_file_and_fail_fast_without() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca_pem, cfg) = private_ca();
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let port = serve_tls(cfg, shard_bytes(tmp.path()));
    let url = format!("https://localhost:{port}/shard.tar");

    // Trusted through SSL_CERT_FILE: the shard loads.
    let out = tmp.path().join("ok.png");
    let run = preview(&url, &out, &[("SSL_CERT_FILE", &ca)]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "preview over HTTPS with SSL_CERT_FILE failed:\n{stderr}");
    assert!(out.is_file());
    // Through SSL_CERT_DIR as well.
    let dir = tmp.path().join("certs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&ca, dir.join("ca.pem")).unwrap();
    let run = preview(&url, &tmp.path().join("dir.png"), &[("SSL_CERT_DIR", &dir)]);
    assert!(run.status.success(), "SSL_CERT_DIR:\n{}", String::from_utf8_lossy(&run.stderr));

    // Not trusted (system and built-in roots only): the shard fails without retries, and the
    // error says what to do.
    let t = Instant::now();
    let run = preview(&url, &tmp.path().join("no.png"), &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "an untrusted certificate must fail the run:\n{stderr}");
    assert!(stderr.contains("certificate") && stderr.contains("SSL_CERT_FILE"), "{stderr}");
    assert!(!stderr.contains("retry 1/"), "a certificate error is not retried:\n{stderr}");
    assert!(t.elapsed() < Duration::from_secs(20), "failed fast: {:?}", t.elapsed());

    // SSL_CERT_FILE naming something that is not a certificate: an error naming the variable.
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let run = preview(&url, &tmp.path().join("junk.png"), &[("SSL_CERT_FILE", &junk)]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("SSL_CERT_FILE"), "{stderr}");
}
