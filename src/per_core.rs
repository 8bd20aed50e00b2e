//! `[proxy] runtime = "thread_per_core"`: one single-threaded tokio
//! runtime per core, each on its own thread with its own `SO_REUSEPORT`
//! listener for every address and its own [`Proxy`] (so its own upstream
//! pools). The kernel spreads new connections over the listeners, and a
//! runtime that gets one while another serves fewer hands it over before
//! reading it (`proxy/balance.rs`), so each serves its share; a
//! connection, its requests and their upstream connections then stay on
//! one thread, as an nginx worker keeps them. Token caches, the admin
//! listener and the emulator stay on the main runtime and are shared, and
//! so are the connection caps (`SharedLimits`): `max_connections` and
//! `upstream_max_connections` hold for the process, not for each core.

use std::{io, net::SocketAddr, thread};

use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{oneshot, watch},
};

use crate::proxy::Proxy;

/// Listen backlog of each listener, as `TcpListener::bind` uses.
const BACKLOG: u32 = 1024;

/// How many runtimes: `TOKIO_WORKER_THREADS` when set (as for the default
/// runtime), else the cores available.
pub(crate) fn cores() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

/// `count` listeners on `addr` sharing the port (`SO_REUSEPORT`), taken
/// off the calling runtime so that each can move to its own. Port 0 is
/// resolved by the first, and the others join it.
pub(crate) fn bind_shared(
    addr: SocketAddr,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let mut at = addr;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = if at.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(at)?;
        let listener = socket.listen(BACKLOG)?;
        at = listener.local_addr()?;
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// Starts runtime `index` on its own thread, serving each proxy on its
/// listener until `stop` turns true. Resolves to the first failure, if any.
pub(crate) fn spawn(
    index: usize,
    servers: Vec<(Proxy, std::net::TcpListener)>,
    stop: watch::Receiver<bool>,
) -> io::Result<oneshot::Receiver<Result<(), String>>> {
    let (done_tx, done_rx) = oneshot::channel();
    thread::Builder::new()
        .name(format!("proxy-core-{index}"))
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime of core {index}: {e}"))
                .and_then(|runtime| runtime.block_on(serve_all(servers, stop)));
            let _ = done_tx.send(result);
        })?;
    Ok(done_rx)
}

async fn serve_all(
    servers: Vec<(Proxy, std::net::TcpListener)>,
    stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut tasks = tokio::task::JoinSet::new();
    for (proxy, listener) in servers {
        let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let mut stop = stop.clone();
        tasks.spawn(proxy.serve(listener, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }));
    }
    let mut failure = None;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e.to_string());
            }
            Err(e) => {
                failure.get_or_insert(format!("its task failed: {e}"));
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_share_one_port_even_when_it_is_chosen_by_the_kernel() {
        let listeners = bind_shared("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
    }
}
