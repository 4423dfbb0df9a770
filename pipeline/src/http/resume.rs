//! Resuming a download where it broke, without ever splicing two different objects.
//!
//! The first response's validator (a strong `ETag`, else `Last-Modified`) and length are kept. A
//! resumed request sends `Range: bytes=N-` and `If-Range: <validator>`; its response is accepted
//! only when it continues the same object:
//! - `206`: `Content-Range` must start at N and give the same total length, and the validator the
//!   response carries (if any) must be the one we have;
//! - `200` (the server ignores ranges, or `If-Range` said the object changed): the validator
//!   must be unchanged (then the first N bytes are skipped); without any validator the length is
//!   the only check.
//!
//! Anything else is an [`ObjectChanged`] error: the bytes already handed to the tar parser came
//! from the old object, so the shard fails with a message saying what changed.

use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, HeaderMap, IF_RANGE, LAST_MODIFIED, RANGE};

/// What identifies the object being downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Validator {
    ETag(String),
    LastModified(String),
}

/// Why a resumed response was refused (the shard fails).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct ObjectChanged(String);

/// The state of one download across its requests.
#[derive(Debug, Default)]
pub(super) struct Resume {
    validator: Option<Validator>,
    /// Length of the whole object, from the first response.
    total: Option<u64>,
}

fn header(h: &HeaderMap, name: reqwest::header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Parses `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let total = if total.trim() == "*" { None } else { Some(total.trim().parse().ok()?) };
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?, total))
}

impl Resume {
    /// Headers of a request for the bytes from `offset` on.
    pub(super) fn request_headers(&self, offset: u64) -> Vec<(reqwest::header::HeaderName, String)> {
        if offset == 0 {
            return vec![];
        }
        let mut h = vec![(RANGE, format!("bytes={offset}-"))];
        match &self.validator {
            Some(Validator::ETag(t)) | Some(Validator::LastModified(t)) => h.push((IF_RANGE, t.clone())),
            None => {}
        }
        h
    }

    /// Whether `offset` bytes are the whole object (a `416` to a resume from there means the
    /// previous try had in fact delivered everything).
    pub(super) fn complete_at(&self, offset: u64) -> bool {
        offset > 0 && self.total == Some(offset)
    }

    /// Checks a 2xx response to a request from `offset`; returns how many leading body bytes to
    /// skip (already delivered).
    pub(super) fn accept(&mut self, offset: u64, status: StatusCode, h: &HeaderMap) -> Result<u64, ObjectChanged> {
        let etag = header(h, ETAG).filter(|t| !t.starts_with("W/")); // weak tags cannot validate ranges
        let modified = header(h, LAST_MODIFIED);
        let length: Option<u64> = header(h, CONTENT_LENGTH).and_then(|v| v.parse().ok());
        if offset == 0 {
            if status != StatusCode::OK {
                return Err(ObjectChanged(format!("expected 200 for a whole-object request, got {status}")));
            }
            self.validator =
                etag.map(|t| Validator::ETag(t.into())).or_else(|| modified.map(|m| Validator::LastModified(m.into())));
            self.total = length;
            return Ok(0);
        }
        // What the response says the object is, against what we started with.
        let changed = match &self.validator {
            Some(Validator::ETag(old)) => match etag {
                Some(new) if new != old => Some(format!("ETag {old} -> {new}")),
                None if status == StatusCode::OK => Some(format!("ETag {old} -> none")),
                _ => None,
            },
            Some(Validator::LastModified(old)) => match modified {
                Some(new) if new != old => Some(format!("Last-Modified {old} -> {new}")),
                None if status == StatusCode::OK => Some(format!("Last-Modified {old} -> none")),
                _ => None,
            },
            None => None,
        };
        if let Some(what) = changed {
            return Err(ObjectChanged(format!(
                "the object changed while it was read ({what}) after {offset} bytes; not splicing two versions"
            )));
        }
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let v = header(h, CONTENT_RANGE).unwrap_or("");
                let Some((first, _last, total)) = parse_content_range(v) else {
                    return Err(ObjectChanged(format!("206 with a missing or bad Content-Range {v:?}")));
                };
                if first != offset {
                    return Err(ObjectChanged(format!("asked for bytes from {offset}, Content-Range is {v:?}")));
                }
                if let (Some(t), Some(known)) = (total, self.total)
                    && t != known
                {
                    return Err(ObjectChanged(format!(
                        "the object changed while it was read (length {known} -> {t}, Content-Range {v:?})"
                    )));
                }
                Ok(0)
            }
            StatusCode::OK => {
                if let (Some(n), Some(known)) = (length, self.total)
                    && n != known
                {
                    return Err(ObjectChanged(format!(
                        "the object changed while it was read (length {known} -> {n}) after {offset} bytes"
                    )));
                }
                Ok(offset) // the whole object again: skip what was delivered
            }
            other => Err(ObjectChanged(format!("unexpected {other} to a range request"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn started(pairs: &[(&'static str, &str)]) -> Resume {
        let mut r = Resume::default();
        assert_eq!(r.accept(0, StatusCode::OK, &headers(pairs)), Ok(0));
        r
    }

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 199, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */200"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn resumed_requests_carry_range_and_if_range() {
        let r = started(&[("etag", "\"v1\""), ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        assert!(r.request_headers(0).is_empty());
        let h = r.request_headers(300);
        assert_eq!(h, vec![(RANGE, "bytes=300-".into()), (IF_RANGE, "\"v1\"".into())]);
        // A weak ETag cannot be used: Last-Modified is.
        let r = started(&[("etag", "W/\"v1\""), ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        assert_eq!(r.request_headers(1)[1], (IF_RANGE, "Sun, 06 Nov 1994 08:49:37 GMT".into()));
        assert_eq!(Resume::default().request_headers(9), vec![(RANGE, "bytes=9-".into())]);
    }

    #[test]
    fn a_matching_206_continues_and_a_200_skips() {
        let mut r = started(&[("etag", "\"v1\""), ("content-length", "1000")]);
        let ok = headers(&[("etag", "\"v1\""), ("content-range", "bytes 300-999/1000")]);
        assert_eq!(r.accept(300, StatusCode::PARTIAL_CONTENT, &ok), Ok(0));
        let again = headers(&[("etag", "\"v1\""), ("content-length", "1000")]);
        assert_eq!(r.accept(300, StatusCode::OK, &again), Ok(300), "range ignored: skip what we have");
        assert!(r.complete_at(1000) && !r.complete_at(999) && !Resume::default().complete_at(1000));
        // No validator at all: the length decides.
        let mut r = started(&[("content-length", "1000")]);
        assert_eq!(r.accept(10, StatusCode::OK, &headers(&[("content-length", "1000")])), Ok(10));
        assert!(r.accept(10, StatusCode::OK, &headers(&[("content-length", "999")])).is_err());
    }

    #[test]
    fn changed_objects_and_bad_ranges_are_refused() {
        let mut r = started(&[("etag", "\"v1\""), ("content-length", "1000")]);
        let cases = [
            (StatusCode::OK, vec![("etag", "\"v2\""), ("content-length", "1000")], "ETag \"v1\" -> \"v2\""),
            (StatusCode::OK, vec![("content-length", "1000")], "ETag \"v1\" -> none"),
            (
                StatusCode::PARTIAL_CONTENT,
                vec![("etag", "\"v2\""), ("content-range", "bytes 300-999/1000")],
                "-> \"v2\"",
            ),
            (StatusCode::PARTIAL_CONTENT, vec![("content-range", "bytes 0-999/1000")], "Content-Range"),
            (StatusCode::PARTIAL_CONTENT, vec![("content-range", "bytes 300-1099/1100")], "length 1000 -> 1100"),
            (StatusCode::PARTIAL_CONTENT, vec![], "missing or bad Content-Range"),
            (StatusCode::NO_CONTENT, vec![], "unexpected 204"),
        ];
        for (status, h, want) in cases {
            let e = r.accept(300, status, &headers(&h)).unwrap_err().to_string();
            assert!(e.contains(want), "{status} {h:?}: {e}");
        }
        let mut r = started(&[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        let e = r.accept(5, StatusCode::OK, &headers(&[("last-modified", "Mon, 07 Nov 1994 08:49:37 GMT")]));
        assert!(e.unwrap_err().to_string().contains("Last-Modified"));
        assert!(Resume::default().accept(0, StatusCode::PARTIAL_CONTENT, &HeaderMap::new()).is_err());
    }
}
