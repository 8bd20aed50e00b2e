//! A private `redis-server` per test: a free loopback port, no persistence,
//! killed when dropped. Tests that need it fail (never skip) when
//! `redis-server` is not installed.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `redis-server` child process.
pub(crate) struct RedisServer {
    child: Option<Child>,
    /// Where it listens (127.0.0.1).
    pub(crate) addr: SocketAddr,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port. Panics with what to do when
    /// `redis-server` is missing.
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments (e.g.
    /// `--requirepass`).
    pub(crate) fn start_with(extra_args: &[&str]) -> Self {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut server = Self {
                child: None,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                dir: tempfile::tempdir().expect("temp dir for redis"),
                extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// `redis://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns the server on `self.addr`; `false` when the port was taken.
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("redis log file");
        let child = Command::new("redis-server")
            .args(["--port", &self.addr.port().to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed: run `bash scripts/test.sh` (installs it, then runs the tests) or `apt-get install redis-server`"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                assert!(
                    log.contains("Address already in use"),
                    "redis-server exited with {status}:\n{log}"
                );
                self.child = None;
                return false;
            }
            if self.answers() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on {} did not answer within 10 s:\n{}",
            self.addr,
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        );
    }

    /// Whether something answers a RESP `PING` on the port (`+PONG`, or an
    /// auth error when a password is required).
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(stream.read(&mut buf), Ok(n) if n > 0 && (buf[0] == b'+' || buf[0] == b'-'))
    }

    /// Stops the server (SIGKILL); its port stays reserved for
    /// [`restart`](Self::restart). Its data is gone (no persistence).
    pub(crate) fn stop(&mut self) {
        self.kill();
    }

    /// Starts it again on the same port.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        assert!(
            self.spawn(),
            "port {} was taken while redis-server was down",
            self.addr.port()
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
