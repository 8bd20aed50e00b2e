//! Header rewriting: hop-by-hop removal (RFC 9110 §7.6.1), `Via` and
//! `X-Forwarded-*`, and the `Cookie` join an h2 → h1 hop needs.

use bytes::{BufMut, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Version,
    header::{self, Entry},
};

/// `Keep-Alive` and `Proxy-Connection` have no constant in `http`.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fixed hop-by-hop list; `Connection` first.
static HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &PROXY_CONNECTION,
    &KEEP_ALIVE,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
];

/// Removes the hop-by-hop fields of a client's request: the fixed list and
/// every field named in any `Connection` line, except `Host`, which says
/// which site the client meant and so is never the client's to drop.
///
/// Runs before the token layer sets its header, so nothing a client names
/// can remove the token; the forwarding fields the proxy adds afterwards
/// (`Via`, `X-Forwarded-*`) are never touched by it either.
pub(super) fn strip_request_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, &[&header::HOST]);
}

/// Removes the hop-by-hop fields of an upstream's response.
pub(super) fn strip_response_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, &[]);
}

/// Removes the fixed hop-by-hop list and the fields named in `Connection`,
/// keeping `protected` even when named.
///
/// One pass over the (few) names present finds which of the list occur;
/// only those are removed. Most requests carry none, and a response usually
/// only `Connection`, so this avoids nine hash lookups per message.
fn strip_hop_by_hop(headers: &mut HeaderMap, protected: &[&HeaderName]) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        strip_connection_named(headers, protected);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// Where `name` is in [`HOP_BY_HOP`], if it is. A match on the name's text
/// (always lower case in a `HeaderName`, however the peer wrote it): the
/// length first, then at most one comparison of bytes, instead of up to
/// nine `HeaderName` comparisons, each of which tells standard from custom
/// names first (260 instructions a request fewer, BENCHMARKS.md).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "proxy-connection" => 1,
        "keep-alive" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "proxy-authenticate" => 7,
        "proxy-authorization" => 8,
        _ => return None,
    })
}

/// Removes the fields listed in (every line of) `Connection`.
fn strip_connection_named(headers: &mut HeaderMap, protected: &[&HeaderName]) {
    // Usually just `keep-alive` or `close`, which name no other field.
    if headers
        .get_all(header::CONNECTION)
        .iter()
        .all(names_no_field)
    {
        return;
    }
    // Rare: the lines are copied (cheap clones of shared bytes) so that the
    // map can be changed while they are read.
    let lines: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    for line in &lines {
        for option in line.as_bytes().split(|&b| b == b',') {
            let option = trim_ows(option);
            if option.is_empty()
                || option.eq_ignore_ascii_case(b"close")
                || option.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            // Parsing lower-cases the name; a token that is no field name
            // names nothing that could be present.
            let Ok(name) = HeaderName::from_bytes(option) else {
                continue;
            };
            if !protected.contains(&&name) {
                headers.remove(&name);
            }
        }
    }
}

/// A `Connection` value that is only `keep-alive` or `close`.
fn names_no_field(connection: &HeaderValue) -> bool {
    let value = connection.as_bytes();
    value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
}

/// `bytes` without optional whitespace (spaces and tabs) at either end.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

// Built at compile time: `HeaderValue::from_static` at run time checks
// every byte on every call.
static VIA_10: HeaderValue = HeaderValue::from_static("1.0 sso-token-proxy");
static VIA_11: HeaderValue = HeaderValue::from_static("1.1 sso-token-proxy");
static VIA_2: HeaderValue = HeaderValue::from_static("2.0 sso-token-proxy");
static VIA_3: HeaderValue = HeaderValue::from_static("3.0 sso-token-proxy");
/// `X-Forwarded-Proto` of every request (the proxy listens in plain HTTP).
pub(super) static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");

/// `Via` value for a request that arrived with `version`.
pub(super) fn via_value(version: Version) -> HeaderValue {
    match version {
        Version::HTTP_2 => &VIA_2,
        Version::HTTP_10 => &VIA_10,
        Version::HTTP_3 => &VIA_3,
        _ => &VIA_11,
    }
    .clone()
}

/// Appends `client` to `X-Forwarded-For`, keeping one field line so that
/// readers of only the first line still see the whole chain.
pub(super) fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    let mut entry = match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(vacant) => {
            vacant.insert(client.clone());
            return;
        }
        Entry::Occupied(occupied) => occupied,
    };
    let mut existing = entry.iter();
    let Some(first) = existing.next() else {
        return;
    };
    let mut joined = BytesMut::with_capacity(first.len() + client.len() + 2);
    joined.put_slice(first.as_bytes());
    for more in existing {
        joined.put_slice(b", ");
        joined.put_slice(more.as_bytes());
    }
    joined.put_slice(b", ");
    joined.put_slice(client.as_bytes());
    // Joining valid field values with ", " is a valid field value.
    if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        entry.insert(value);
    }
}

/// HTTP/2 lets a client split `Cookie` into several fields (RFC 9113
/// §8.2.3); an HTTP/1.1 hop needs them joined with `; `.
pub(super) fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = BytesMut::with_capacity(first.len() * 2);
    for (i, value) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.put_slice(b"; ");
        }
        joined.put_slice(value.as_bytes());
    }
    if let Ok(mut value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        value.set_sensitive(true);
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_fixed_list_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "x-other-hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-authenticate", "Basic"),
            ("x-secret-hop", "1"),
            ("x-other-hop", "2"),
            ("x-end-to-end", "3"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        strip_response_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-end-to-end", "set-cookie"]);
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    }

    #[test]
    fn the_index_by_text_is_the_place_in_the_fixed_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for other in [
            "host",
            "content-length",
            "x-connection",
            "connections",
            "t",
            "tes",
        ] {
            let name = HeaderName::from_static(other);
            assert_eq!(hop_by_hop_index(&name), None, "{other}");
        }
    }

    #[test]
    fn strips_only_what_is_present() {
        // Nothing hop-by-hop: untouched.
        let mut h = map(&[("host", "a"), ("accept", "*/*"), ("x-keep", "1")]);
        strip_response_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
        // `Connection: keep-alive` (a typical response) names nothing else.
        let mut h = map(&[
            ("content-length", "2"),
            ("connection", "Keep-Alive"),
            ("keep-alive", "timeout=5"),
            ("server", "up"),
        ]);
        strip_response_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-length", "server"]);
        // Fixed-list fields without `Connection`.
        let mut h = map(&[("te", "trailers"), ("upgrade", "h2c"), ("accept", "*/*")]);
        strip_response_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept"]);
    }

    #[test]
    fn a_request_names_any_field_in_connection_but_host() {
        let mut h = map(&[
            ("host", "app"),
            ("authorization", "Bearer client"),
            ("connection", "Keep-Alive,\tAUTHORIZATION , x-a"),
            ("connection", "host, X-Forwarded-For,,"),
            ("connection", "not a name, close"),
            ("x-a", "1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-kept", "2"),
        ]);
        strip_request_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "x-kept"]);
        // A response may drop whatever it names.
        let mut h = map(&[("connection", "host"), ("host", "x")]);
        strip_response_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn options_are_trimmed_of_spaces_and_tabs_only() {
        assert_eq!(trim_ows(b" \t a b\t "), b"a b");
        assert_eq!(trim_ows(b" \t "), b"");
        assert_eq!(trim_ows(b""), b"");
    }

    #[test]
    fn forwarded_for_is_appended_to_one_line() {
        let client = HeaderValue::from_static("127.0.0.1");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &client);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        append_forwarded_for(&mut h, &client);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
    }

    #[test]
    fn split_cookies_are_joined() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
        let mut h = map(&[("cookie", "a=1")]);
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1");
    }

    #[test]
    fn via_names_the_inbound_version() {
        assert_eq!(via_value(Version::HTTP_11), "1.1 sso-token-proxy");
        assert_eq!(via_value(Version::HTTP_2), "2.0 sso-token-proxy");
        assert_eq!(via_value(Version::HTTP_10), "1.0 sso-token-proxy");
    }
}
