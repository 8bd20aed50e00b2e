//! [`ClientIo`]: a client's socket as the server sees it, reporting what
//! the connection's timers need: whether writes make progress, and what
//! the HTTP/2 frame monitor concludes.
//!
//! Once the monitor reports a flood, the client's unread bytes are dropped,
//! a GOAWAY (ENHANCE_YOUR_CALM) is written if the server's output is
//! between two frames, and the socket reads as closed, so the connection
//! ends within the read that saw the flood.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    activity::ConnActivity,
    h2_monitor::{FrameMonitor, Verdict},
};

/// A client connection's socket, watched.
#[derive(Debug)]
pub(super) struct ClientIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    frames: FrameMonitor,
    /// Set once a flood was seen: reads end, writes fail.
    cut: bool,
}

impl<T> ClientIo<T> {
    pub(super) fn new(
        inner: T,
        activity: Arc<ConnActivity>,
        control_frames_per_second: u32,
    ) -> Self {
        Self {
            inner,
            activity,
            frames: FrameMonitor::new(control_frames_per_second),
            cut: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> ClientIo<T> {
    /// One attempt, without waiting, to put a GOAWAY on the wire; a client
    /// that does not read gets none.
    fn send_goaway(&mut self, cx: &mut Context<'_>) {
        if let Some(frame) = self.frames.goaway() {
            let _ = Pin::new(&mut self.inner).poll_write(cx, &frame);
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.cut {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.frames.is_off() {
            return Poll::Ready(Ok(()));
        }
        if this.frames.read(&buf.filled()[before..]) == Verdict::Flood {
            // The flood's bytes never reach the server.
            buf.set_filled(before);
            this.cut = true;
            this.activity.mark_abusive();
            this.send_goaway(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> ClientIo<T> {
    fn wrote(&mut self, result: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match &result {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Ok(_)) => self.activity.write_progressed(),
            Poll::Ready(Err(_)) => {}
        }
        result
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "connection closed for flooding HTTP/2 control frames",
    )
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.cut {
            return Poll::Ready(Err(closed()));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result
            && !this.frames.is_off()
        {
            this.frames.wrote(&buf[..n]);
        }
        this.wrote(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.cut {
            return Poll::Ready(Err(closed()));
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = result
            && !this.frames.is_off()
        {
            for buf in bufs {
                let take = n.min(buf.len());
                this.frames.wrote(&buf[..take]);
                n -= take;
                if n == 0 {
                    break;
                }
            }
        }
        this.wrote(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_flood_ends_the_read_side_after_a_goaway() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let activity = ConnActivity::new(Arc::default());
        let mut io = ClientIo::new(server, Arc::clone(&activity), 3);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        for _ in 0..10 {
            hello.extend(ping);
        }
        client_write.write_all(&hello).await.unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = io.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
        }
        // At most the preface and three pings got through.
        assert!(seen.len() <= 24 + 3 * 17, "{}", seen.len());
        assert!(activity.is_abusive());
        assert!(io.write(b"x").await.is_err());
        let mut goaway = [0u8; 17];
        client_read.read_exact(&mut goaway).await.unwrap();
        assert_eq!(goaway[3], 0x7);
        assert_eq!(u32::from_be_bytes(goaway[13..].try_into().unwrap()), 11);
    }

    #[tokio::test]
    async fn http1_bytes_pass_untouched() {
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = ConnActivity::new(Arc::default());
        let mut io = ClientIo::new(server, Arc::clone(&activity), 1);
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20);
        client.write_all(&request).await.unwrap();
        drop(client);
        let mut seen = Vec::new();
        io.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, request);
        assert!(!activity.is_abusive());
    }
}
