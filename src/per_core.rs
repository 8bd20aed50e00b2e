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
//!
//! With `cpu_affinity = "auto"` (the default), a process that starts as
//! many runtimes as there are CPUs it may run on binds runtime N to the Nth
//! of them, so that two runtimes never share a core while another core
//! runs something else (BENCHMARKS.md, "Each runtime on its own CPU").

use std::{io, net::SocketAddr, thread};

use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{oneshot, watch},
};

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

use crate::{config::CpuAffinity, proxy::Proxy};

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

/// The CPU each of `runtimes` runtimes is to be bound to under `affinity`:
/// the CPUs the process may run on, in order, when there are as many of
/// them as runtimes and at least two; `None` when there are more or fewer
/// (a CPU quota below the CPUs allowed, or `TOKIO_WORKER_THREADS` set
/// apart from them: binding would stack the runtimes of every such process
/// on the first CPUs), when `affinity` is off, and when the CPUs cannot be
/// read.
pub(crate) fn cpus_for(affinity: CpuAffinity, runtimes: usize) -> Option<Vec<usize>> {
    if affinity == CpuAffinity::Off || runtimes < 2 {
        return None;
    }
    match allowed_cpus() {
        Ok(allowed) => one_each(&allowed, runtimes),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CPUs this process may run on; the runtimes run unbound");
            None
        }
    }
}

fn one_each(allowed: &[usize], runtimes: usize) -> Option<Vec<usize>> {
    (runtimes >= 2 && allowed.len() == runtimes).then(|| allowed.to_vec())
}

/// The CPUs the calling thread may run on (its affinity mask, which a
/// container's cpuset or `taskset` narrows).
fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// Binds the calling thread to `cpu`; a failure leaves it unbound, with a
/// warning.
fn bind_to(index: usize, cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu);
    if let Err(e) = sched_setaffinity(None, &set) {
        tracing::warn!(core = index, cpu, error = %e, "cannot bind the runtime to its CPU; it runs unbound");
    }
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

/// Starts runtime `index` on its own thread (bound to `cpu` when given),
/// serving each proxy on its listener until `stop` turns true. Resolves to
/// the first failure, if any.
pub(crate) fn spawn(
    index: usize,
    cpu: Option<usize>,
    servers: Vec<(Proxy, std::net::TcpListener)>,
    stop: watch::Receiver<bool>,
) -> io::Result<oneshot::Receiver<Result<(), String>>> {
    let (done_tx, done_rx) = oneshot::channel();
    thread::Builder::new()
        .name(format!("proxy-core-{index}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                bind_to(index, cpu);
            }
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

    #[test]
    fn runtimes_are_bound_only_when_they_match_the_cpus_allowed_one_for_one() {
        assert_eq!(one_each(&[0, 1], 2), Some(vec![0, 1]));
        // A cpuset that is not the first CPUs: its own CPUs, in order.
        assert_eq!(one_each(&[4, 5, 9], 3), Some(vec![4, 5, 9]));
        // More CPUs allowed than runtimes (a CPU quota, or
        // TOKIO_WORKER_THREADS below them): nothing bound.
        assert_eq!(one_each(&[0, 1, 2, 3], 2), None);
        assert_eq!(one_each(&[0, 1, 2, 3], 1), None);
        // More runtimes than CPUs.
        assert_eq!(one_each(&[0, 1], 4), None);
        // One runtime on one CPU: nothing to gain.
        assert_eq!(one_each(&[3], 1), None);
        assert_eq!(cpus_for(CpuAffinity::Off, 2), None);
        assert_eq!(cpus_for(CpuAffinity::Auto, 1), None);
    }

    #[test]
    fn the_cpus_allowed_are_the_ones_of_the_affinity_mask() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        let mut from_proc = Vec::new();
        for part in list.split(',') {
            match part.split_once('-') {
                Some((a, b)) => from_proc.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
                None => from_proc.push(part.parse().unwrap()),
            }
        }
        assert_eq!(allowed, from_proc);
        assert_eq!(
            cpus_for(CpuAffinity::Auto, allowed.len()),
            (allowed.len() >= 2).then(|| allowed.clone())
        );
    }
}
