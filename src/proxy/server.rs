//! The accept loop, one task per client connection, the idle timeout, and
//! the graceful drain.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use super::{Proxy, body::ConnActivity, service::ConnService};

/// How long to pause accepting after an error such as "too many open files".
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub(super) async fn serve(
    proxy: Proxy,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let settings = proxy.settings;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!("a connection task panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let local = match stream.local_addr() {
                        Ok(local) => local,
                        Err(e) => {
                            tracing::debug!(error = %e, "accepted connection already gone");
                            continue;
                        }
                    };
                    let activity = ConnActivity::new(Arc::clone(&proxy.metrics));
                    let service = ConnService {
                        stack: proxy.stack_for(remote),
                        check: Arc::clone(&proxy.check),
                        local,
                        max_replay_body_bytes: settings.max_replay_body_bytes,
                        activity: Arc::clone(&activity),
                        metrics: Arc::clone(&proxy.metrics),
                    };
                    connections.spawn(serve_connection(
                        Arc::clone(&builder),
                        stream,
                        remote,
                        service,
                        activity,
                        settings.idle_timeout,
                        stop_rx.clone(),
                    ));
                }
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "connection failed before it was accepted");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept connections; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }

    // New connections are refused from here on.
    drop(listener);
    let _ = stop_tx.send(true);
    tracing::info!(
        connections = connections.len(),
        grace_ms = settings.shutdown_grace.as_millis() as u64,
        "proxy shutting down; draining connections"
    );
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "shutdown grace period over; closing the remaining connections"
        );
        connections.shutdown().await;
    }
    tracing::info!("proxy stopped");
    Ok(())
}

/// Serves one client connection until it ends, closing it gracefully on
/// shutdown or after `idle_timeout` without a request in flight.
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    remote: SocketAddr,
    service: ConnService,
    activity: Arc<ConnActivity>,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, error = &*e as &dyn std::error::Error, "client connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|stop| *stop), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = activity.idle_for(idle_timeout), if !closing => {
                tracing::debug!(%remote, "closing idle client connection");
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Errors about one connection, not about the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
