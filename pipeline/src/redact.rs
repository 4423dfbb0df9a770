//! Secrets out of logs and files: credentials in URLs (`user:password@`) and signature or token
//! query parameters (presigned S3/GCS/Azure URLs) are shown as `***` wherever a shard source is
//! logged, printed or stored (checkpoints, feature files).
//!
//! This module knows URLs and text only (it imports nothing of the crate): a shard's shown name
//! is made once, when its [`ShardSpec`](crate::source::ShardSpec) is made, and a whole source
//! string is redacted by [`crate::source::redacted`].

/// Query parameters whose values are secrets (compared case-insensitively).
const SECRET_PARAMS: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "signature",
    "sig",
    "token",
    "access_token",
    "sas",
    "se",
    "sp",
    "sv",
    "skoid",
    "sktid",
    "password",
    "secret",
    "key",
    "api_key",
    "apikey",
];

/// `url` with its credentials and secret query values replaced by `***`. Something that is not
/// an absolute URL keeps its text, except the values of secret parameters after a `?` (a
/// relative `x.tar?X-Amz-Signature=...`); a local path or a plain URL comes back unchanged.
pub fn url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else { return relative(url) };
    if u.cannot_be_a_base() {
        return relative(url);
    }
    let mut changed = false;
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_username("***");
        let _ = u.set_password(None);
        changed = true;
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        if pairs.iter().any(|(k, _)| is_secret(k)) {
            let redacted: Vec<(String, String)> =
                pairs.into_iter().map(|(k, v)| if is_secret(&k) { (k, "***".to_string()) } else { (k, v) }).collect();
            u.query_pairs_mut().clear().extend_pairs(redacted);
            changed = true;
        }
    }
    if changed { u.to_string().replace("%2A%2A%2A", "***") } else { url.to_string() }
}

fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SECRET_PARAMS.contains(&k.as_str())
}

/// A string that is not an absolute URL (a path, a URL's last segment) with the values of secret
/// parameters of its query (after the first `?`) replaced by `***`; the rest is kept as it is.
fn relative(s: &str) -> String {
    let Some((head, query)) = s.split_once('?') else { return s.to_string() };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret(k) => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}?{}", pairs.join("&"))
}

/// `text` (an error message, a log line) with every URL in it redacted; URLs end at white space
/// or a closing bracket or quote.
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme: the letters before "://".
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map_or(0, |j| j + 1);
        let mut end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | ']' | '"' | '\'' | '>'))
            .map_or(rest.len(), |j| i + j);
        // Punctuation after a URL ("url: message") is not part of it.
        while end > i + 3 && rest[..end].ends_with([':', ',', ';', '.']) {
            end -= 1;
        }
        out.push_str(&rest[..start]);
        out.push_str(&url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Whether `source` had anything redacted (a stored copy can then not be used to read it).
pub fn is_redacted(source: &str) -> bool {
    source.contains("***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_signatures_are_hidden() {
        let u = "https://alice:s3cr3t@data.example.com/shards/train-{000..009}.tar";
        let r = url(u);
        assert!(!r.contains("alice") && !r.contains("s3cr3t") && r.contains("***@data.example.com"), "{r}");
        let p = "https://b.s3.amazonaws.com/x.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2Fabc&X-Amz-Signature=deadbeef&part=1";
        let r = url(p);
        assert!(!r.contains("deadbeef") && !r.contains("AKIA"), "{r}");
        assert!(r.contains("X-Amz-Signature=***") && r.contains("X-Amz-Algorithm=AWS4") && r.contains("part=1"), "{r}");
        let az = "https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=abc%3D&se=2030";
        assert!(!url(az).contains("abc"), "{}", url(az));
        assert!(is_redacted(&url(az)));
    }

    #[test]
    fn urls_inside_messages_are_redacted() {
        let m = "shard http://u:pw@h/x.tar?sig=abc: error sending request for url (http://h/x.tar?sig=abc) done";
        let r = text(m);
        assert!(!r.contains("pw") && !r.contains("abc"), "{r}");
        assert!(r.starts_with("shard http://***@h/x.tar?sig=***: error") && r.ends_with(") done"), "{r}");
        assert_eq!(text("no url here"), "no url here");
    }

    #[test]
    fn plain_urls_and_paths_are_unchanged() {
        for s in [
            "/data/shards/train-{000000..000099}.tar",
            "data/shards",
            "http://127.0.0.1:8000/train-000000.tar",
            "https://host/x.tar?part=1&shard=2",
        ] {
            assert_eq!(url(s), s);
            assert!(!is_redacted(&url(s)));
        }
    }

    /// Regression: the shown name of a presigned shard (`x.tar?X-Amz-Signature=...`, the last
    /// segment of its URL) is not an absolute URL, and was passed through with its signature.
    #[test]
    fn secret_parameters_of_a_relative_name_are_hidden() {
        let r = url("x.tar?X-Amz-Algorithm=AWS4&X-Amz-Signature=deadbeef&sig&part=1");
        assert_eq!(r, "x.tar?X-Amz-Algorithm=AWS4&X-Amz-Signature=***&sig&part=1");
        assert_eq!(url("shards/a?b.tar"), "shards/a?b.tar", "a `?` in a file name stays");
        assert_eq!(url("x.tar?token=a=b"), "x.tar?token=***");
    }
}
