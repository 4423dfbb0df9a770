//! A tiny HTTP/1.1 file server for the HTTP tests: `Range` and `If-Range` support, an `ETag` on
//! every response, and faults injected per file name.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What goes wrong for one file.
#[derive(Clone, Debug, Default)]
pub struct Fault {
    /// Answer this status to the first `.1` requests, with this `Retry-After` header (`date+N`:
    /// an HTTP-date N seconds after the response).
    pub status: Option<(u16, usize, Option<String>)>,
    /// The first body: send this many bytes, then drop the connection.
    pub cut: Option<usize>,
    /// The first body: one byte every this many milliseconds (200 at most, then it hangs up).
    pub drip_ms: Option<u64>,
    /// After the first response the object is another version (`ETag: "v2"`); `If-Range: "v1"`
    /// then gets the whole new object (200), as RFC 9110 says.
    pub change_etag: bool,
    /// Ignore `Range` (always 200 with the whole object).
    pub ignore_range: bool,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub name: String,
    pub range_start: usize,
    pub if_range: Option<String>,
    pub at: Instant,
}

pub struct Server {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    /// The requests for one file.
    pub fn requests_for(&self, name: &str) -> Vec<Request> {
        self.requests.lock().unwrap().iter().filter(|r| r.name == name).cloned().collect()
    }
}

/// Serves `dir` on `bind` (`127.0.0.1:0`, `[::1]:0`); `None` when that address cannot be bound.
pub fn serve_on(bind: &str, dir: PathBuf, faults: HashMap<String, Fault>) -> Option<Server> {
    let listener = TcpListener::bind(bind).ok()?;
    let addr = listener.local_addr().ok()?;
    let requests = Arc::new(Mutex::new(Vec::new()));
    let faults = Arc::new(Mutex::new(faults));
    let log = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (dir, faults, log) = (dir.clone(), faults.clone(), log.clone());
            std::thread::spawn(move || handle(stream, &dir, &faults, &log));
        }
    });
    Some(Server { addr, requests })
}

pub fn serve(dir: PathBuf, faults: HashMap<String, Fault>) -> Server {
    serve_on("127.0.0.1:0", dir, faults).expect("bind 127.0.0.1")
}

fn empty(s: &mut TcpStream, status: &str, extra: &str) {
    let _ = write!(s, "HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n");
}

fn handle(mut s: TcpStream, dir: &Path, faults: &Mutex<HashMap<String, Fault>>, log: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let (mut range_start, mut if_range) = (0usize, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range_start = v.trim().trim_end_matches('-').parse().unwrap_or(0);
        } else if lower.starts_with("if-range:") {
            if_range = Some(line["if-range:".len()..].trim().to_string());
        }
    }
    // The file name: the path without its query (presigned URLs carry their signature there).
    let target = first.split_whitespace().nth(1).unwrap_or("/");
    let name = target.split('?').next().unwrap_or(target).trim_start_matches('/').to_string();
    let earlier = {
        let mut log = log.lock().unwrap();
        let n = log.iter().filter(|r| r.name == name).count();
        log.push(Request { name: name.clone(), range_start, if_range: if_range.clone(), at: Instant::now() });
        n
    };
    let fault = faults.lock().unwrap().get(&name).cloned().unwrap_or_default();
    if let Some((code, times, retry_after)) = &fault.status
        && earlier < *times
    {
        // `date+N`: an HTTP-date N seconds from now.
        let value = |v: &String| match v.strip_prefix("date+").and_then(|n| n.parse().ok()) {
            Some(n) => httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(n)),
            None => v.clone(),
        };
        let extra = retry_after.as_ref().map(|v| format!("Retry-After: {}\r\n", value(v))).unwrap_or_default();
        empty(&mut s, &format!("{code} Injected"), &extra);
        return;
    }
    let Ok(data) = std::fs::read(dir.join(&name)) else {
        empty(&mut s, "404 Not Found", "");
        return;
    };
    let etag = if fault.change_etag && earlier > 0 { "\"v2\"" } else { "\"v1\"" };
    let partial = range_start > 0 && !fault.ignore_range && if_range.as_deref().is_none_or(|t| t == etag);
    let start = if partial { range_start.min(data.len()) } else { 0 };
    let body = &data[start..];
    let head = if partial {
        format!(
            "HTTP/1.1 206 Partial Content\r\nETag: {etag}\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n",
            body.len(),
            start,
            data.len() - 1,
            data.len()
        )
    } else {
        format!("HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
    };
    let _ = s.write_all(head.as_bytes());
    let once = {
        let mut faults = faults.lock().unwrap();
        let f = faults.get_mut(&name);
        f.map(|f| (f.cut.take(), f.drip_ms.take())).unwrap_or_default() // only the first body is faulty
    };
    match once {
        (Some(n), _) => {
            let _ = s.write_all(&body[..n.min(body.len())]);
            let _ = s.flush();
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        (None, Some(ms)) => {
            // At most 200 bytes, then the connection drops (a client without a low-speed limit
            // would otherwise wait for hours).
            for b in body.iter().take(200) {
                if s.write_all(&[*b]).and_then(|()| s.flush()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(ms));
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        (None, None) => {
            let _ = s.write_all(body);
        }
    }
}
