//! [`FrameMonitor`]: a guard against HTTP/2 control-frame floods that
//! looks only at the 9-byte frame headers on a client connection.
//!
//! h2 answers every SETTINGS and PING, and processes PRIORITY,
//! WINDOW_UPDATE, RST_STREAM, unknown frame types and empty frames, without
//! a limit of its own on how many a client may send per second (it bounds
//! empty DATA frames per connection, CONTINUATIONs per header block, and
//! resets). One client sending nothing but those frames would keep a core
//! busy. The monitor counts them as they are read, before h2 sees them, and
//! reports a flood once more than the budget arrive within one second; the
//! connection is then sent GOAWAY (ENHANCE_YOUR_CALM) and closed, as
//! Envoy's and nginx's flood guards do.
//!
//! It is not an HTTP/2 codec: it checks the client preface, reads frame
//! headers (length, type, flags, stream id) to find frame boundaries, and
//! skips payloads. It also follows the frames the server writes, to know
//! when a GOAWAY can be put on the wire between two of them.

use std::time::Duration;

use tokio::time::Instant;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADER_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The window the budget is counted over.
const WINDOW: Duration = Duration::from_secs(1);

/// What the monitor concluded from the bytes it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Fine,
    Flood,
}

/// Where the monitor is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// Matching the client preface; this many bytes matched so far.
    Preface(u8),
    /// Not HTTP/2 (the preface did not match): nothing to watch.
    Off,
    /// In a frame header; this many of its bytes are in `header`.
    Header(u8),
    /// In a frame's payload; this many bytes of it are still to come.
    Payload(u32),
}

/// Follows frame boundaries in one direction of a connection.
#[derive(Debug, Clone, Copy)]
struct Framing {
    header: [u8; HEADER_LEN],
    /// Bytes of `header` filled, or, when zero, payload still to come.
    filled: u8,
    remaining: u32,
}

impl Framing {
    const fn new() -> Self {
        Self {
            header: [0; HEADER_LEN],
            filled: 0,
            remaining: 0,
        }
    }

    fn at_boundary(&self) -> bool {
        self.filled == 0 && self.remaining == 0
    }
}

/// Counts an HTTP/2 client's control frames; see the module docs.
#[derive(Debug)]
pub(super) struct FrameMonitor {
    reading: Reading,
    read: Framing,
    written: Framing,
    /// Control frames allowed per [`WINDOW`].
    budget: u32,
    counted: u32,
    window_start: Option<Instant>,
    /// The highest stream id the client opened.
    last_stream: u32,
}

impl FrameMonitor {
    /// A monitor for a new connection; whether it speaks HTTP/2 shows in
    /// its first bytes.
    pub(super) fn new(budget_per_second: u32) -> Self {
        Self {
            reading: Reading::Preface(0),
            read: Framing::new(),
            written: Framing::new(),
            budget: budget_per_second,
            counted: 0,
            window_start: None,
            last_stream: 0,
        }
    }

    /// Whether the connection is not HTTP/2, so there is nothing to watch.
    pub(super) fn is_off(&self) -> bool {
        matches!(self.reading, Reading::Off)
    }

    /// Looks at bytes the client sent, in order.
    pub(super) fn read(&mut self, mut bytes: &[u8]) -> Verdict {
        while !bytes.is_empty() {
            match self.reading {
                Reading::Off => return Verdict::Fine,
                Reading::Preface(matched) => {
                    let at = usize::from(matched);
                    let n = bytes.len().min(PREFACE.len() - at);
                    if bytes[..n] != PREFACE[at..at + n] {
                        self.reading = Reading::Off;
                        return Verdict::Fine;
                    }
                    bytes = &bytes[n..];
                    self.reading = if at + n == PREFACE.len() {
                        Reading::Header(0)
                    } else {
                        Reading::Preface((at + n) as u8)
                    };
                }
                Reading::Header(filled) => {
                    let at = usize::from(filled);
                    let n = bytes.len().min(HEADER_LEN - at);
                    self.read.header[at..at + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if at + n < HEADER_LEN {
                        self.reading = Reading::Header((at + n) as u8);
                        continue;
                    }
                    let len = frame_len(&self.read.header);
                    if self.is_control(len) && self.count(Instant::now()) == Verdict::Flood {
                        return Verdict::Flood;
                    }
                    self.reading = if len == 0 {
                        Reading::Header(0)
                    } else {
                        Reading::Payload(len)
                    };
                }
                Reading::Payload(remaining) => {
                    let n = bytes.len().min(remaining as usize);
                    bytes = &bytes[n..];
                    let left = remaining - n as u32;
                    self.reading = if left == 0 {
                        Reading::Header(0)
                    } else {
                        Reading::Payload(left)
                    };
                }
            }
        }
        Verdict::Fine
    }

    /// Whether the frame whose header was just read counts against the
    /// budget; notes the streams the client opens.
    fn is_control(&mut self, len: u32) -> bool {
        let header = &self.read.header;
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        match kind {
            HEADERS => {
                self.last_stream = self.last_stream.max(stream);
                len == 0
            }
            DATA => len == 0 && flags & END_STREAM == 0,
            CONTINUATION => len == 0,
            SETTINGS | PING | PRIORITY | RST_STREAM | WINDOW_UPDATE => true,
            // A client's GOAWAY ends the connection; its PUSH_PROMISE is a
            // protocol error h2 answers at once.
            GOAWAY | PUSH_PROMISE => false,
            // Unknown types are ignored by h2, but cost a read each.
            _ => true,
        }
    }

    fn count(&mut self, now: Instant) -> Verdict {
        let start = *self.window_start.get_or_insert(now);
        self.counted += 1;
        if self.counted <= self.budget {
            return Verdict::Fine;
        }
        if now.saturating_duration_since(start) < WINDOW {
            return Verdict::Flood;
        }
        self.window_start = Some(now);
        self.counted = 1;
        Verdict::Fine
    }

    /// Notes bytes the server wrote, in order.
    pub(super) fn wrote(&mut self, mut bytes: &[u8]) {
        if !matches!(self.reading, Reading::Header(_) | Reading::Payload(_)) {
            return;
        }
        let w = &mut self.written;
        while !bytes.is_empty() {
            if w.remaining > 0 {
                let n = bytes.len().min(w.remaining as usize);
                w.remaining -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let at = usize::from(w.filled);
            let n = bytes.len().min(HEADER_LEN - at);
            w.header[at..at + n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if at + n < HEADER_LEN {
                w.filled = (at + n) as u8;
            } else {
                w.filled = 0;
                w.remaining = frame_len(&w.header);
            }
        }
    }

    /// A GOAWAY (ENHANCE_YOUR_CALM) to write now, if the server's output
    /// is between two frames.
    pub(super) fn goaway(&self) -> Option<[u8; 17]> {
        if !self.written.at_boundary() {
            return None;
        }
        let mut frame = [0u8; 17];
        frame[..3].copy_from_slice(&8u32.to_be_bytes()[1..]);
        frame[3] = GOAWAY;
        frame[9..13].copy_from_slice(&self.last_stream.to_be_bytes());
        frame[13..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        Some(frame)
    }
}

fn frame_len(header: &[u8; HEADER_LEN]) -> u32 {
    u32::from_be_bytes([0, header[0], header[1], header[2]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    fn connected(budget: u32) -> FrameMonitor {
        let mut m = FrameMonitor::new(budget);
        assert_eq!(m.read(PREFACE), Verdict::Fine);
        assert!(!m.is_off());
        m
    }

    #[test]
    fn http1_switches_the_monitor_off() {
        let mut m = FrameMonitor::new(1);
        assert_eq!(m.read(b"PRI * HTTP/1.1\r\n"), Verdict::Fine);
        assert!(m.is_off());
        let mut m = FrameMonitor::new(1);
        assert_eq!(m.read(b"GET / HTTP/1.1\r\n"), Verdict::Fine);
        assert!(m.is_off());
        // Off stays off, whatever follows.
        for _ in 0..10 {
            assert_eq!(m.read(&frame(PING, 0, 0, &[0; 8])), Verdict::Fine);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn control_frames_over_the_budget_within_a_second_are_a_flood() {
        let mut m = connected(5);
        let ping = frame(PING, 0, 0, &[1; 8]);
        for _ in 0..5 {
            assert_eq!(m.read(&ping), Verdict::Fine);
        }
        assert_eq!(m.read(&ping), Verdict::Flood);

        // The same number spread over more than a second is fine.
        let mut m = connected(5);
        for _ in 0..3 {
            for _ in 0..5 {
                assert_eq!(m.read(&ping), Verdict::Fine);
            }
            tokio::time::advance(Duration::from_millis(1001)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn frames_split_anywhere_are_counted_once() {
        let mut bytes = Vec::new();
        for _ in 0..4 {
            bytes.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
            // Data with a payload is no control frame.
            bytes.extend(frame(DATA, 0, 1, b"hello"));
            bytes.extend(frame(DATA, END_STREAM, 1, b""));
        }
        for split in 1..bytes.len() {
            let mut m = connected(4);
            let (a, b) = bytes.split_at(split);
            assert_eq!(m.read(a), Verdict::Fine, "split {split}");
            assert_eq!(m.read(b), Verdict::Fine, "split {split}");
            assert_eq!(m.read(&frame(PING, 0, 0, &[0; 8])), Verdict::Flood);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn empty_frames_count_and_streams_are_noted() {
        let mut m = connected(3);
        assert_eq!(m.read(&frame(HEADERS, 0x4, 1, b"\x82")), Verdict::Fine);
        assert_eq!(m.read(&frame(HEADERS, 0x4, 7, b"\x82")), Verdict::Fine);
        assert_eq!(m.last_stream, 7);
        assert_eq!(m.read(&frame(DATA, 0, 1, b"")), Verdict::Fine);
        assert_eq!(m.read(&frame(CONTINUATION, 0, 1, b"")), Verdict::Fine);
        assert_eq!(m.read(&frame(0x42, 0, 0, b"x")), Verdict::Fine);
        assert_eq!(
            m.read(&frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 1])),
            Verdict::Flood
        );
    }

    #[test]
    fn goaway_only_between_written_frames() {
        let mut m = connected(10);
        let mut m2 = connected(10);
        m2.last_stream = 5;
        assert!(m.goaway().is_some());
        let settings = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
        m.wrote(&settings[..4]);
        assert!(m.goaway().is_none());
        m.wrote(&settings[4..12]);
        assert!(m.goaway().is_none());
        m.wrote(&settings[12..]);
        let goaway = m2.goaway().unwrap();
        assert_eq!(goaway[..9], [0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        assert_eq!(goaway[9..13], 5u32.to_be_bytes());
        assert_eq!(goaway[13..], ENHANCE_YOUR_CALM.to_be_bytes());
        assert!(m.goaway().is_some());
    }
}
