//! [`UpstreamPath`]: where a request target lands under the upstream's base
//! path, with dot segments removed, and never above the base path.
//!
//! The path of a request target (HTTP/1 origin or absolute form, or h2
//! `:path`) is normalised before it is joined with the base path:
//!
//! * dot segments are removed as in RFC 3986 §5.2.4, also when their dots
//!   are percent-encoded (`%2e`, `%2E`, mixed as in `.%2e`);
//! * empty segments (`//`) are collapsed;
//! * a `..` that would climb above the target's root, and so above the base
//!   path, refuses the request ([`PathRefusal::AboveBase`]) instead of
//!   being clamped at the root as RFC 3986 would: such a target is an
//!   attack, not a typo.
//!
//! Everything else is kept byte for byte: other percent-encodings, `;`
//! parameters, and the query.
//!
//! Encoded slashes (`%2F`, `%5C`) and raw backslashes are not separators to
//! the proxy, but some upstreams (and frameworks in front of them) decode
//! them, or treat `..;` as `..`. With [`EscapedSlashes::Keep`] (the default)
//! they are forwarded unchanged, and the forwarded path must also stay under
//! the base path when read that lenient way; with
//! [`EscapedSlashes::Reject`] any of them refuses the request. Envoy's
//! `path_with_escaped_slashes_action` offers the same two choices among
//! others.
//!
//! The common target has none of this: one scan over its bytes says so, and
//! it is joined without further work.

use bytes::{BufMut as _, Bytes, BytesMut};
use http::uri::PathAndQuery;

/// What to do with `%2F`, `%5C` (any case) and `\` in a request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Forward them unchanged; refuse a path that, with them read as `/`
    /// (and `..;x` read as `..`), would leave the base path.
    #[default]
    Keep,
    /// Refuse any path that contains one.
    Reject,
}

/// Why a request target is not forwarded (answered `400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// The path climbs above the base path (also when read leniently, see
    /// [`EscapedSlashes::Keep`]).
    AboveBase,
    /// The path holds an encoded slash or a backslash and
    /// [`EscapedSlashes::Reject`] is configured.
    EscapedSlash,
    /// The target has no path starting with `/` (e.g. `*`).
    NotAPath,
}

/// The upstream's base path and the policy its targets are joined under.
#[derive(Debug, Clone)]
pub struct UpstreamPath {
    /// Without its trailing `/`; empty when the upstream has no path.
    base: Bytes,
    escaped_slashes: EscapedSlashes,
    /// A route's path prefix removed from the normalised path before the
    /// join (without its trailing `/`).
    strip: Option<Bytes>,
}

impl UpstreamPath {
    /// The base path of an upstream URL's `path` (`"/"` or `""` for none).
    pub fn new(path: &str, escaped_slashes: EscapedSlashes) -> Self {
        Self {
            base: Bytes::copy_from_slice(path.trim_end_matches('/').as_bytes()),
            escaped_slashes,
            strip: None,
        }
    }

    /// Removes `prefix` (a path prefix, matched at a segment boundary as
    /// `prefix_len` does) from the normalised path before joining it: a
    /// route for `/v1` with an upstream base `/api` sends `/v1/x` to
    /// `/api/x`. A target without the prefix is refused
    /// ([`PathRefusal::NotAPath`]); the rest of the path must stay under
    /// the base path like any target.
    #[must_use]
    pub fn strip_prefix(mut self, prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        self.strip = (!prefix.is_empty()).then(|| Bytes::copy_from_slice(prefix.as_bytes()));
        self
    }

    /// The base path, without a trailing `/`.
    pub fn base(&self) -> &[u8] {
        &self.base
    }

    /// The upstream's path and query for a request target's: the path
    /// normalised and joined under the base path, the query unchanged.
    pub fn join(&self, target: Option<&PathAndQuery>) -> Result<PathAndQuery, PathRefusal> {
        let Some(target) = target else {
            let root = self.stripped(b"/")?;
            return self.joined(root, None);
        };
        let path = target.path().as_bytes();
        if is_plain(path) {
            if self.base.is_empty() && self.strip.is_none() {
                // Nothing to change: the target as received (shared bytes).
                return Ok(target.clone());
            }
            let rest = self.stripped(path)?;
            return self.joined(rest, target.query());
        }
        if path.first() != Some(&b'/') {
            return Err(PathRefusal::NotAPath);
        }
        if self.escaped_slashes == EscapedSlashes::Reject && has_escaped_slash(path) {
            return Err(PathRefusal::EscapedSlash);
        }
        let normalised = remove_dot_segments(path)?;
        let rest = self.stripped(&normalised)?;
        // What an upstream that decodes slashes or honours `..;` would see
        // (of what is forwarded: a stripped prefix is no ground to climb).
        if !stays_under_root_leniently(rest) {
            return Err(PathRefusal::AboveBase);
        }
        self.joined(rest, target.query())
    }

    /// `path` without the prefix to strip, if any; still starting with `/`.
    fn stripped<'p>(&self, path: &'p [u8]) -> Result<&'p [u8], PathRefusal> {
        let Some(prefix) = &self.strip else {
            return Ok(path);
        };
        let end = prefix_len(path, prefix).ok_or(PathRefusal::NotAPath)?;
        Ok(match &path[end..] {
            [] => b"/",
            rest => rest,
        })
    }

    fn joined(&self, path: &[u8], query: Option<&str>) -> Result<PathAndQuery, PathRefusal> {
        let query_len = query.map_or(0, |q| q.len() + 1);
        let mut out = BytesMut::with_capacity(self.base.len() + path.len() + query_len);
        out.put_slice(&self.base);
        out.put_slice(path);
        if let Some(query) = query {
            out.put_u8(b'?');
            out.put_slice(query.as_bytes());
        }
        // Segments and query came from a valid target, the base from a
        // valid URL: the join is valid too.
        PathAndQuery::from_maybe_shared(out.freeze()).map_err(|_| PathRefusal::NotAPath)
    }
}

/// A request path with dot segments and empty segments removed, as
/// [`UpstreamPath::join`] normalises it (before its checks of escaped
/// slashes): what a route's path prefix is matched against.
pub(crate) fn normalise(path: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, PathRefusal> {
    if is_plain(path) {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    if path.first() != Some(&b'/') {
        return Err(PathRefusal::NotAPath);
    }
    remove_dot_segments(path).map(std::borrow::Cow::Owned)
}

/// How many bytes of `path` the path prefix `prefix` (starting with `/`,
/// without a trailing `/`) covers, when `path` starts with it at a segment
/// boundary (`/v1` covers `/v1` and `/v1/x`, not `/v10`). A percent-encoded
/// unreserved character in `path` (`%31` for `1`) counts as that character
/// (RFC 3986 §6.2.2.2); anything else is compared byte for byte.
pub(crate) fn prefix_len(path: &[u8], prefix: &[u8]) -> Option<usize> {
    let mut i = 0;
    for &want in prefix {
        let (got, len) = match path.get(i..i + 3) {
            Some([b'%', hi, lo]) => match (hex(*hi), hex(*lo)) {
                (Some(hi), Some(lo)) if is_unreserved(hi << 4 | lo) => (hi << 4 | lo, 3),
                _ => (b'%', 1),
            },
            _ => (*path.get(i)?, 1),
        };
        if got != want {
            return None;
        }
        i += len;
    }
    match path.get(i) {
        None | Some(b'/') => Some(i),
        Some(_) => None,
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// True when `path` starts with `/` and has no segment that is empty or
/// starts with `.` or `%`, no encoded slash and no backslash: nothing to
/// normalise and nothing to check.
fn is_plain(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut after_slash = true;
    for (i, &b) in path.iter().enumerate().skip(1) {
        match b {
            b'/' | b'.' | b'%' if after_slash => return false,
            b'\\' => return false,
            b'%' if escaped_slash_at(path, i) => return false,
            _ => {}
        }
        after_slash = b == b'/';
    }
    true
}

/// `%2F`, `%2f`, `%5C` or `%5c` starts at `path[i]`.
fn escaped_slash_at(path: &[u8], i: usize) -> bool {
    matches!(
        path.get(i..i + 3),
        Some([b'%', b'2', b'f' | b'F'] | [b'%', b'5', b'c' | b'C'])
    )
}

fn has_escaped_slash(path: &[u8]) -> bool {
    (0..path.len()).any(|i| path[i] == b'\\' || escaped_slash_at(path, i))
}

/// How many dots `segment` spells, each written `.` or `%2e`/`%2E`; `None`
/// when it holds anything else.
fn dots(segment: &[u8]) -> Option<usize> {
    let mut rest = segment;
    let mut n = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return None,
        };
        n += 1;
    }
    Some(n)
}

/// RFC 3986 §5.2.4 on a path starting with `/`, with percent-encoded dots
/// and empty segments removed too; `Err` when a `..` would climb above the
/// root.
fn remove_dot_segments(path: &[u8]) -> Result<Vec<u8>, PathRefusal> {
    let mut kept: Vec<&[u8]> = Vec::new();
    // Whether the result ends in `/` (a last segment that is empty or a
    // dot segment leaves a directory).
    let mut trailing_slash = false;
    for segment in path[1..].split(|&b| b == b'/') {
        trailing_slash = true;
        match dots(segment) {
            // Empty segment or `.`.
            Some(0 | 1) => {}
            Some(2) => {
                if kept.pop().is_none() {
                    return Err(PathRefusal::AboveBase);
                }
            }
            _ => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for segment in &kept {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

/// Whether `path` stays at or under its root when `%2F`, `%5C` and `\`
/// also separate segments and a segment's `;` parameters are ignored (as
/// Tomcat reads `/..;/`), also when the `;` is escaped (`%3B`), for an
/// upstream that decodes before it drops parameters.
fn stays_under_root_leniently(path: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut start = 0;
    let mut i = 0;
    let segment_end = |start: usize, end: usize, depth: &mut usize| -> bool {
        let segment = &path[start..end];
        let params = (0..segment.len()).find(|&i| {
            segment[i] == b';'
                || (segment[i] == b'%'
                    && segment.get(i + 1) == Some(&b'3')
                    && matches!(segment.get(i + 2), Some(b'b' | b'B')))
        });
        let before_params = params.map_or(segment, |p| &segment[..p]);
        match dots(before_params) {
            Some(0 | 1) => true,
            Some(2) => match depth.checked_sub(1) {
                Some(d) => {
                    *depth = d;
                    true
                }
                None => false,
            },
            _ => {
                *depth += 1;
                true
            }
        }
    };
    while i < path.len() {
        let separator_len = if path[i] == b'/' || path[i] == b'\\' {
            1
        } else if escaped_slash_at(path, i) {
            3
        } else {
            0
        };
        if separator_len > 0 {
            if !segment_end(start, i, &mut depth) {
                return false;
            }
            i += separator_len;
            start = i;
        } else {
            i += 1;
        }
    }
    segment_end(start, path.len(), &mut depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(base: &str, target: &str) -> Result<String, PathRefusal> {
        join_with(base, target, EscapedSlashes::Keep)
    }

    fn join_with(base: &str, target: &str, policy: EscapedSlashes) -> Result<String, PathRefusal> {
        let target: PathAndQuery = target.parse().unwrap();
        UpstreamPath::new(base, policy)
            .join(Some(&target))
            .map(|pq| pq.as_str().to_owned())
    }

    #[test]
    fn plain_targets_are_joined_unchanged() {
        assert_eq!(join("", "/a/b?x=/../&y").unwrap(), "/a/b?x=/../&y");
        assert_eq!(join("/api/", "/a/b.json?q").unwrap(), "/api/a/b.json?q");
        assert_eq!(join("/api", "/").unwrap(), "/api/");
        assert_eq!(join("/api", "/a/").unwrap(), "/api/a/");
        assert_eq!(
            join("/api", "/a.b/c..d/e%41?").unwrap(),
            "/api/a.b/c..d/e%41?"
        );
        assert_eq!(
            UpstreamPath::new("/api", EscapedSlashes::Keep)
                .join(None)
                .unwrap(),
            "/api/"
        );
        assert!(is_plain(b"/a/b.c/d;e/"));
        assert!(!is_plain(b"/a/./b"));
        assert!(!is_plain(b"/a//b"));
        assert!(!is_plain(b"/a/%2e"));
        assert!(!is_plain(b"/a%2Fb"));
        assert!(!is_plain(b"/a\\b"));
        assert!(!is_plain(b"*"));
    }

    #[test]
    fn dot_segments_are_removed_also_when_encoded() {
        for (target, want) in [
            ("/a/./b", "/api/a/b"),
            ("/a/b/../c", "/api/a/c"),
            ("/a/b/..", "/api/a/"),
            ("/a/b/.", "/api/a/b/"),
            ("/a/%2e/b", "/api/a/b"),
            ("/a/b/%2E%2e/c", "/api/a/c"),
            ("/a/b/.%2E/c", "/api/a/c"),
            ("/a/b/%2e./c?x=1", "/api/a/c?x=1"),
            ("/a//b///c", "/api/a/b/c"),
            ("//", "/api/"),
            ("/a/..", "/api/"),
            ("/a/../", "/api/"),
            ("/./", "/api/"),
            ("/.../a", "/api/.../a"),
            ("/a/..b/c.", "/api/a/..b/c."),
            ("/%2e%2e%2e", "/api/%2e%2e%2e"),
            ("/%41/%2", "/api/%41/%2"),
        ] {
            assert_eq!(join("/api", target).unwrap(), want, "{target}");
        }
        assert_eq!(join("", "/a/../b?q=%2e%2e").unwrap(), "/b?q=%2e%2e");
    }

    #[test]
    fn climbing_above_the_base_is_refused() {
        for target in [
            "/..",
            "/../internal",
            "/%2e%2e/internal",
            "/%2E%2E/internal",
            "/.%2e/x",
            "/a/../../x",
            "/a/./../b/../../x",
            "//../x",
        ] {
            assert_eq!(
                join("/api", target),
                Err(PathRefusal::AboveBase),
                "{target}"
            );
            assert_eq!(join("", target), Err(PathRefusal::AboveBase), "{target}");
        }
    }

    #[test]
    fn escaped_slashes_are_kept_but_may_not_climb_out() {
        assert_eq!(join("/api", "/a%2Fb/c").unwrap(), "/api/a%2Fb/c");
        assert_eq!(join("/api", "/a%2f..%2fb").unwrap(), "/api/a%2f..%2fb");
        assert_eq!(join("/api", "/a/b%5C..%5Cc").unwrap(), "/api/a/b%5C..%5Cc");
        assert_eq!(join("/api", "/a/..%3Bv/b").unwrap(), "/api/a/..%3Bv/b");
        for target in [
            "/..%2Finternal",
            "/..%2finternal",
            "/%2e%2e%2Fx",
            "/a%2F..%2F..%2Fx",
            "/..%5Cx",
            "/..%5cx",
            "/..\\x",
            "/a\\..\\..\\x",
            "/..;/x",
            "/a/..;jsessionid=1/..;/x",
            "/%2e%2e;x/y",
            "/x/..%3b/..%3b/secret",
            "/x/..%3B/..%3B/secret",
            "/x/%2e%2e%3b/%2e%2e%3b/secret",
            // Raw dot segments removed first, then read leniently: the
            // upstream gets `/..%2Fc`.
            "/a%2Fb/../..%2Fc",
        ] {
            assert_eq!(
                join("/api", target),
                Err(PathRefusal::AboveBase),
                "{target}"
            );
        }
        assert_eq!(
            join_with("/api", "/a%2Fb", EscapedSlashes::Reject),
            Err(PathRefusal::EscapedSlash)
        );
        assert_eq!(
            join_with("/api", "/a\\b", EscapedSlashes::Reject),
            Err(PathRefusal::EscapedSlash)
        );
        assert_eq!(
            join_with("/api", "/a/%2e/b%2", EscapedSlashes::Reject).unwrap(),
            "/api/a/b%2"
        );
    }

    #[test]
    fn only_paths_are_joined() {
        let star: PathAndQuery = "*".parse().unwrap();
        assert_eq!(
            UpstreamPath::new("/api", EscapedSlashes::Keep).join(Some(&star)),
            Err(PathRefusal::NotAPath)
        );
    }

    fn join_stripped(base: &str, prefix: &str, target: &str) -> Result<String, PathRefusal> {
        let target: PathAndQuery = target.parse().unwrap();
        UpstreamPath::new(base, EscapedSlashes::Keep)
            .strip_prefix(prefix)
            .join(Some(&target))
            .map(|pq| pq.as_str().to_owned())
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert_eq!(prefix_len(b"/v1", b"/v1"), Some(3));
        assert_eq!(prefix_len(b"/v1/x", b"/v1"), Some(3));
        assert_eq!(prefix_len(b"/v10/x", b"/v1"), None);
        assert_eq!(prefix_len(b"/v", b"/v1"), None);
        assert_eq!(prefix_len(b"/V1/x", b"/v1"), None);
        // Encoded unreserved characters are those characters.
        assert_eq!(prefix_len(b"/v%31/x", b"/v1"), Some(5));
        assert_eq!(prefix_len(b"/%76%31", b"/v1"), Some(7));
        // Other encodings are not.
        assert_eq!(prefix_len(b"/v1%2Fx", b"/v1"), None);
        assert_eq!(prefix_len(b"/a%2Fb/x", b"/a/b"), None);
        assert_eq!(prefix_len(b"/v%3", b"/v1"), None);
        assert_eq!(normalise(b"/v1/../v2/./x").unwrap().as_ref(), b"/v2/x");
        assert_eq!(normalise(b"/v1//x").unwrap().as_ref(), b"/v1/x");
        assert_eq!(normalise(b"/../x"), Err(PathRefusal::AboveBase));
        assert_eq!(normalise(b"*"), Err(PathRefusal::NotAPath));
    }

    #[test]
    fn a_stripped_prefix_is_removed_and_gives_no_room_to_climb() {
        assert_eq!(
            join_stripped("/api", "/v1/", "/v1/x?q").unwrap(),
            "/api/x?q"
        );
        assert_eq!(join_stripped("/api", "/v1", "/v1").unwrap(), "/api/");
        assert_eq!(join_stripped("", "/v1", "/v1/").unwrap(), "/");
        assert_eq!(join_stripped("", "/v1", "/v%31/a/./b").unwrap(), "/a/b");
        assert_eq!(
            join_stripped("/api", "/v1", "/v1/a/../b").unwrap(),
            "/api/b"
        );
        assert_eq!(
            join_stripped("/api", "/v1", "/v2/x"),
            Err(PathRefusal::NotAPath)
        );
        for climbing in [
            "/v1/..",
            "/v1/../x",
            "/v1/..%2Fx",
            "/v1/a/..%2F..%2Fx",
            "/v1/..;/x",
        ] {
            assert!(
                join_stripped("/api", "/v1", climbing).is_err(),
                "{climbing}"
            );
        }
    }

    #[test]
    fn dots_counts_plain_and_encoded_dots() {
        assert_eq!(dots(b""), Some(0));
        assert_eq!(dots(b"."), Some(1));
        assert_eq!(dots(b"%2E"), Some(1));
        assert_eq!(dots(b".%2e"), Some(2));
        assert_eq!(dots(b"..."), Some(3));
        assert_eq!(dots(b".a"), None);
        assert_eq!(dots(b"%2"), None);
        assert_eq!(dots(b"%2f"), None);
    }
}
