//! [`ReplayCopy`]: the copy of a request kept for a replay after a `401`,
//! its head flattened into one buffer.
//!
//! Cloning `request::Parts` costs two allocations for the `HeaderMap`, one
//! atomic operation per value, and an allocation for each value built from
//! a `&str` (its bytes are promoted to shared storage). Worse, the values
//! and the URI of a request hyper parsed share hyper's read buffer, so a
//! cloned head keeps that buffer alive for the whole upstream round trip
//! and hyper allocates a new one for the next request. The copy here is one
//! allocation that shares nothing; a `Request` is rebuilt from
//! it only when a replay is sent, which is rare.

use std::fmt;

use bytes::Bytes;
use http::{
    Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version,
    uri::{self, Authority, PathAndQuery, Scheme},
};

use super::ReplayableBody;

/// Per field in [`ReplayCopy::head`]: the name's length (`u16`, as header
/// names are at most 64 KiB), the value's length (`u32`) and whether the
/// value is sensitive (`u8`), then the name's and the value's bytes.
const FIELD_PREFIX: usize = 2 + 4 + 1;

/// Room made per field before copying: one pass over the fields, not a
/// second one to size the buffer; it grows for a larger head, and is not
/// trimmed (a reallocation per request for a few bytes held briefly).
const FIELD_GUESS: usize = FIELD_PREFIX + 40;

/// A copy of a request to send again after a `401`: the head in one owned
/// buffer, the extensions and a copy of the body.
///
/// Its `Debug` shows no bytes of the head: it holds the token the request
/// carried and whatever credentials the caller sent.
pub(crate) struct ReplayCopy<B> {
    method: Method,
    version: Version,
    scheme: Option<Scheme>,
    /// Lengths of the URI's authority and path-and-query, the first bytes
    /// of `head` (in that order), when the URI has them.
    authority_len: Option<u32>,
    path_and_query_len: Option<u32>,
    /// The authority, the path-and-query, then every header field in the
    /// order the request's `HeaderMap` iterates them, each as
    /// [`FIELD_PREFIX`] says.
    head: Vec<u8>,
    /// Number of header fields in `head`.
    fields: usize,
    extensions: Extensions,
    body: B,
}

impl<B> fmt::Debug for ReplayCopy<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCopy")
            .field("method", &self.method)
            .field("version", &self.version)
            .field("fields", &self.fields)
            .finish_non_exhaustive()
    }
}

impl<B: ReplayableBody> ReplayCopy<B> {
    /// A copy of `request`, or `None` when its body cannot be copied.
    pub(crate) fn of(request: &Request<B>) -> Option<Self> {
        let body = request.body().try_clone()?;
        let uri = request.uri();
        let authority = uri.authority().map(Authority::as_str);
        let path_and_query = uri.path_and_query().map(PathAndQuery::as_str);
        let headers = request.headers();

        let uri_len = authority.map_or(0, str::len) + path_and_query.map_or(0, str::len);
        let mut head = Vec::with_capacity(uri_len + headers.len() * FIELD_GUESS);
        head.extend_from_slice(authority.unwrap_or_default().as_bytes());
        head.extend_from_slice(path_and_query.unwrap_or_default().as_bytes());
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            // Names are at most 64 KiB; a value of 4 GiB is not replayed.
            let [n0, n1] = u16::try_from(name.len()).ok()?.to_le_bytes();
            let [v0, v1, v2, v3] = u32::try_from(value.len()).ok()?.to_le_bytes();
            let sensitive = u8::from(value.is_sensitive());
            head.extend_from_slice(&[n0, n1, v0, v1, v2, v3, sensitive]);
            head.extend_from_slice(name);
            head.extend_from_slice(value.as_bytes());
        }

        Some(Self {
            method: request.method().clone(),
            version: request.version(),
            scheme: uri.scheme().cloned(),
            authority_len: authority.map(|a| a.len() as u32),
            path_and_query_len: path_and_query.map(|p| p.len() as u32),
            head,
            fields: headers.len(),
            extensions: request.extensions().clone(),
            body,
        })
    }
}

impl<B> ReplayCopy<B> {
    /// The request again, as it was copied. `None` only if a part no longer
    /// parses, which the `http` crate's own checks rule out for parts built
    /// through its API; the request is then not replayed.
    pub(crate) fn into_request(self) -> Option<Request<B>> {
        let head = Bytes::from(self.head);
        let mut at = 0;
        let mut take = |len: usize| {
            let part = head.slice(at..at + len);
            at += len;
            part
        };

        let mut parts = uri::Parts::default();
        parts.scheme = self.scheme;
        if let Some(len) = self.authority_len {
            parts.authority = Some(Authority::from_maybe_shared(take(len as usize)).ok()?);
        }
        if let Some(len) = self.path_and_query_len {
            parts.path_and_query = Some(PathAndQuery::from_maybe_shared(take(len as usize)).ok()?);
        }
        let uri = Uri::from_parts(parts).ok()?;

        let mut headers = HeaderMap::with_capacity(self.fields);
        for _ in 0..self.fields {
            let prefix = take(FIELD_PREFIX);
            let name_len = u16::from_le_bytes([prefix[0], prefix[1]]) as usize;
            let value_len =
                u32::from_le_bytes([prefix[2], prefix[3], prefix[4], prefix[5]]) as usize;
            let name = HeaderName::from_bytes(&take(name_len)).ok()?;
            let mut value = HeaderValue::from_maybe_shared(take(value_len)).ok()?;
            value.set_sensitive(prefix[6] != 0);
            headers.append(name, value);
        }

        let mut request = Request::new(self.body);
        *request.method_mut() = self.method;
        *request.uri_mut() = uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = headers;
        *request.extensions_mut() = self.extensions;
        Some(request)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderValue, Method, Request, Version, header};
    use http_body_util::{BodyExt as _, Full};

    use super::*;
    use crate::layer::ReplayBody;

    #[derive(Debug, Clone, PartialEq)]
    struct Marker(u32);

    fn sensitive(value: &'static str) -> HeaderValue {
        let mut value = HeaderValue::from_static(value);
        value.set_sensitive(true);
        value
    }

    /// Everything a replay sends, in the order it goes on the wire.
    fn wire_view<B>(request: &Request<B>) -> impl PartialEq + fmt::Debug {
        let fields: Vec<_> = request
            .headers()
            .iter()
            .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
            .collect();
        (
            request.method().clone(),
            request.uri().clone(),
            request.version(),
            fields,
            request.extensions().get::<Marker>().cloned(),
        )
    }

    fn replayed<B: ReplayableBody>(request: Request<B>) -> (Request<B>, Request<B>) {
        let copy = ReplayCopy::of(&request).expect("a replayable body");
        let replay = copy.into_request().expect("the copy rebuilds");
        (request, replay)
    }

    #[tokio::test]
    async fn a_replay_is_the_request_as_it_was_copied() {
        let mut request = Request::builder()
            .method(Method::PATCH)
            .uri("https://user@api.example:8443/v1/items/%2F?x=1&y=a+b")
            .version(Version::HTTP_2)
            .header(header::ACCEPT, "application/json")
            .header("x-multi", "one")
            .header(header::AUTHORIZATION, sensitive("Bearer secret-token"))
            .header("x-multi", "two")
            .header(header::COOKIE, sensitive("a=1"))
            .header("x-multi", "three")
            .header("x-empty", "")
            // Beyond the room first made per field: the buffer grows.
            .header("x-long", "v".repeat(5000))
            .header(
                "x-obs-text",
                HeaderValue::from_bytes(b"caf\xe9\t!").unwrap(),
            )
            .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
            .unwrap();
        request.extensions_mut().insert(Marker(7));

        let (request, replay) = replayed(request);
        assert_eq!(wire_view(&replay), wire_view(&request));
        let values: Vec<_> = replay.headers().get_all("x-multi").iter().collect();
        assert_eq!(values, ["one", "two", "three"]);
        assert!(replay.headers()[header::AUTHORIZATION].is_sensitive());
        assert!(!replay.headers()["x-multi"].is_sensitive());
        let body = replay.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "{\"a\":1}");
    }

    #[test]
    fn every_form_of_request_target_survives() {
        for target in [
            "/",
            "/a/b?q=1",
            "/only?",
            "*",
            "http://example.com",
            "http://example.com/x",
            "https://[::1]:8443/p?q#frag",
            "example.com:443",
            "custom-scheme://host/path",
        ] {
            let method = if target.starts_with("example.com") {
                Method::CONNECT
            } else {
                Method::OPTIONS
            };
            let request = Request::builder()
                .method(method)
                .uri(target)
                .body(())
                .unwrap();
            let (request, replay) = replayed(request);
            assert_eq!(wire_view(&replay), wire_view(&request), "{target}");
            assert_eq!(replay.uri().to_string(), request.uri().to_string());
        }
    }

    #[test]
    fn an_extension_method_and_a_bare_request_survive() {
        let request = Request::builder()
            .method(Method::from_bytes(b"PROPFIND-WITH-A-LONG-NAME").unwrap())
            .body(Bytes::new())
            .unwrap();
        let (request, replay) = replayed(request);
        assert_eq!(wire_view(&replay), wire_view(&request));
        assert!(replay.headers().is_empty());
    }

    #[test]
    fn the_copy_shares_no_bytes_with_the_request() {
        // As hyper hands them over: values and URI slices of one buffer.
        let buffer = Bytes::from(b"/path?q=1 value-one value-two".to_vec());
        let mut request = Request::builder()
            .uri(Uri::from_maybe_shared(buffer.slice(0..9)).unwrap())
            .body(())
            .unwrap();
        let headers = request.headers_mut();
        headers.insert(
            "x-a",
            HeaderValue::from_maybe_shared(buffer.slice(10..19)).unwrap(),
        );
        headers.insert(
            "x-b",
            HeaderValue::from_maybe_shared(buffer.slice(20..29)).unwrap(),
        );
        let copy = ReplayCopy::of(&request).unwrap();
        drop(request);
        // The buffer is unique again: nothing in the copy points into it.
        assert!(buffer.is_unique());
        let replay = copy.into_request().unwrap();
        assert_eq!(replay.uri(), "/path?q=1");
        assert_eq!(replay.headers()["x-b"], "value-two");
    }

    #[test]
    fn a_streamed_body_gets_no_copy() {
        let request = Request::new(ReplayBody::streaming(Full::new(Bytes::new())));
        assert!(ReplayCopy::of(&request).is_none());
    }

    #[test]
    fn debug_shows_no_header_bytes() {
        let request = Request::builder()
            .header(header::AUTHORIZATION, sensitive("Bearer secret-token"))
            .header("x-api-key", "key-material")
            .body(())
            .unwrap();
        let copy = ReplayCopy::of(&request).unwrap();
        let shown = format!("{copy:?}");
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(!shown.contains("key-material"), "{shown}");
        assert!(shown.contains("fields: 2"), "{shown}");
    }
}
