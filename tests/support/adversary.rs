//! Clients for `tests/adversarial.rs` that send what no well-behaved client
//! would: raw HTTP/1 bytes on a keep-alive connection, and raw HTTP/2 frames
//! (with a literal-only HPACK encoder) on an h2c connection.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::{Instant, timeout},
};

/// Bound on any single wait, so that a bug fails instead of hanging.
pub(crate) const GUARD: Duration = Duration::from_secs(30);

// === HTTP/1 ===

/// A response read off a raw connection.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `error` member of a JSON body.
    pub(crate) fn error(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body))
        });
        v["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// One HTTP/1 connection driven byte by byte.
pub(crate) struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Like [`RawConn::send`], but a write the peer refused is no failure.
    pub(crate) async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads more bytes; `false` at end of stream or on an error.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match timeout(GUARD, self.stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no bytes and no close within {GUARD:?}"),
        }
    }

    /// The next response, or `None` when the connection closed first.
    /// Bodies are delimited by `Content-Length`, chunked coding, or close.
    pub(crate) async fn response(&mut self) -> Option<Answer> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(len) = get("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                if !self.fill().await {
                    break;
                }
            }
            self.buf.drain(..len.min(self.buf.len())).collect()
        } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            self.chunked_body().await
        } else if status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else {
            while self.fill().await {}
            std::mem::take(&mut self.buf)
        };
        Some(Answer {
            status,
            headers,
            body,
        })
    }

    async fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if !self.fill().await {
                    return body;
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                if !self.fill().await {
                    return body;
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
            if size == 0 {
                return body;
            }
        }
    }

    /// Waits until the peer closes the connection (reading and dropping
    /// whatever it sends); `false` if it is still open after `limit`.
    pub(crate) async fn closed_within(&mut self, limit: Duration) -> bool {
        wait_eof(&mut self.stream, limit).await
    }

    pub(crate) fn into_stream(self) -> TcpStream {
        self.stream
    }
}

/// Reads and drops bytes until end of stream or an error (`true`), or until
/// `limit` passes (`false`).
pub(crate) async fn wait_eof(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut sink = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends one request on a fresh connection and reads one response.
pub(crate) async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Answer> {
    let mut conn = RawConn::connect(addr).await;
    conn.send(request).await;
    conn.response().await
}

// === HTTP/2 ===

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) const DATA: u8 = 0;
pub(crate) const HEADERS: u8 = 1;
pub(crate) const PRIORITY: u8 = 2;
pub(crate) const RST_STREAM: u8 = 3;
pub(crate) const SETTINGS: u8 = 4;
pub(crate) const PING: u8 = 6;
pub(crate) const GOAWAY: u8 = 7;
pub(crate) const WINDOW_UPDATE: u8 = 8;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;

pub(crate) const PROTOCOL_ERROR: u32 = 1;
pub(crate) const CANCEL: u32 = 8;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 11;

/// One frame as read off the wire.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
    pub(crate) payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub(crate) fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// The bytes of one frame.
pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of "literal without indexing, new name" fields, no
/// Huffman coding: any name and value, valid or not, goes out as given.
pub(crate) fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A GET request's fields for `path`.
pub(crate) fn get_fields<'a>(
    path: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut fields = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "app.example"),
        (":path", path),
    ];
    fields.extend_from_slice(extra);
    fields
}

/// An h2c connection spoken frame by frame.
pub(crate) struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects and sends the preface and an empty SETTINGS frame.
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let mut conn = Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        conn.send(&hello).await;
        conn
    }

    /// Connects like [`RawH2::connect`], opening no flow-control window for
    /// any stream: `SETTINGS_INITIAL_WINDOW_SIZE` (0x4) is 0.
    pub(crate) async fn connect_without_window(addr: SocketAddr) -> Self {
        let mut conn = Self::connect(addr).await;
        conn.send(&frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0])).await;
        conn
    }

    /// Opens `stream` with a whole GET of `path` (HEADERS with END_STREAM).
    pub(crate) async fn get(&mut self, stream: u32, path: &str, extra: &[(&str, &str)]) {
        let block = header_block(&get_fields(path, extra));
        self.send(&frame(HEADERS, END_HEADERS | END_STREAM, stream, &block))
            .await;
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Like [`RawH2::send`], but a write the peer refused is no failure.
    pub(crate) async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next frame, or `None` once the connection is closed.
    pub(crate) async fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match timeout(GUARD, self.stream.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("no frame and no close within {GUARD:?}"),
            }
        }
    }

    /// Reads frames (acknowledging the server's SETTINGS) until one on
    /// `stream` that ends it or resets it, or a GOAWAY; `None` on close.
    pub(crate) async fn stream_end(&mut self, stream: u32) -> Option<Frame> {
        while let Some(f) = self.frame().await {
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                // The peer may be closing already.
                let _ = self.try_send(&frame(SETTINGS, ACK, 0, &[])).await;
                continue;
            }
            let ends = f.stream == stream
                && (f.kind == RST_STREAM
                    || (f.kind == HEADERS || f.kind == DATA) && f.flags & END_STREAM != 0);
            if ends || f.kind == GOAWAY {
                return Some(f);
            }
        }
        None
    }

    /// Reads frames (acknowledging the server's SETTINGS) until the
    /// response HEADERS on `stream`, its RST_STREAM, or a GOAWAY; `None` on
    /// close.
    pub(crate) async fn stream_head(&mut self, stream: u32) -> Option<Frame> {
        while let Some(f) = self.frame().await {
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                // The peer may be closing already.
                let _ = self.try_send(&frame(SETTINGS, ACK, 0, &[])).await;
                continue;
            }
            let answers = f.stream == stream && (f.kind == RST_STREAM || f.kind == HEADERS);
            if answers || f.kind == GOAWAY {
                return Some(f);
            }
        }
        None
    }

    /// The response head and body on `stream`; `None` if the stream is
    /// reset or the connection ends first.
    pub(crate) async fn stream_response(&mut self, stream: u32) -> Option<(Frame, Vec<u8>)> {
        let head = self.stream_head(stream).await?;
        if head.kind != HEADERS {
            return None;
        }
        let mut body = Vec::new();
        if head.flags & END_STREAM != 0 {
            return Some((head, body));
        }
        while let Some(f) = self.frame().await {
            if f.stream != stream {
                continue;
            }
            match f.kind {
                DATA => {
                    body.extend_from_slice(&f.payload);
                    if f.flags & END_STREAM != 0 {
                        return Some((head, body));
                    }
                }
                RST_STREAM => return None,
                _ => {}
            }
        }
        None
    }

    /// Reads frames until a GOAWAY (returned) or the close (`None`).
    pub(crate) async fn goaway(&mut self) -> Option<Frame> {
        while let Some(f) = self.frame().await {
            if f.kind == GOAWAY {
                return Some(f);
            }
        }
        None
    }

    /// Waits for the close after reading everything the peer sends.
    pub(crate) async fn closed_within(&mut self, limit: Duration) -> bool {
        wait_eof(&mut self.stream, limit).await
    }
}

/// The `:status` of a response HEADERS frame that h2 encoded from its
/// static table (200, 204, 206, 304, 400, 404, 500), which is how h2 sends
/// these.
pub(crate) fn static_status(headers: &Frame) -> Option<u16> {
    match headers.payload.first()? {
        0x88 => Some(200),
        0x89 => Some(204),
        0x8a => Some(206),
        0x8b => Some(304),
        0x8c => Some(400),
        0x8d => Some(404),
        0x8e => Some(500),
        _ => None,
    }
}

/// Floods an h2c connection: sends `setup` after the preface and SETTINGS,
/// then `unit` over and over until the proxy stops taking bytes, while
/// reading what it answers. Returns the first GOAWAY it sent (if any), and
/// whether it then closed the connection within [`GUARD`].
pub(crate) async fn flood(addr: SocketAddr, setup: &[u8], unit: &[u8]) -> (Option<Frame>, bool) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend_from_slice(setup);
    wr.write_all(&hello).await.expect("write the preface");
    // Many units per write, so the flood is fast.
    let batch: Vec<u8> = unit.repeat((16 * 1024 / unit.len()).max(1));
    let writer = tokio::spawn(async move {
        let deadline = Instant::now() + GUARD;
        while Instant::now() < deadline {
            if wr.write_all(&batch).await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let mut goaway = None;
    let deadline = Instant::now() + GUARD;
    let mut chunk = vec![0u8; 64 * 1024];
    let closed = loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Err(_) => break false,
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        // Frames in what arrived; look for the GOAWAY.
        while goaway.is_none() && buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == GOAWAY {
                goaway = Some(Frame {
                    kind: GOAWAY,
                    flags: buf[4],
                    stream: 0,
                    payload: buf[9..9 + len].to_vec(),
                });
            }
            buf.drain(..9 + len);
        }
        if goaway.is_some() {
            buf.clear();
        }
    };
    writer.abort();
    (goaway, closed)
}
