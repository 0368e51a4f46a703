//! The accept loop: HTTP/1.1 connections (WebSocket upgrades included) with a cap on how many
//! are open at once, a deadline for each request header that also closes idle keep-alive
//! connections, and a graceful drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// How connections are admitted and timed out.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most open connections (HTTP and WebSocket); further clients wait in the listen backlog.
    pub permits: Arc<Semaphore>,
    /// Time a connection gets to send a complete request header; also how long an idle
    /// keep-alive connection stays open.
    pub header_timeout: Duration,
}

/// The connection cap that fits the process's open-file limit (raised to its hard limit
/// first): `wanted`, or the limit less a reserve for model files, logs and the listener.
pub fn connection_cap(wanted: usize) -> usize {
    const RESERVE: u64 = 64;
    match raise_open_file_limit() {
        Some(limit) if limit.saturating_sub(RESERVE) < wanted as u64 => {
            let cap = limit.saturating_sub(RESERVE).max(1) as usize;
            tracing::warn!(
                wanted,
                cap,
                open_file_limit = limit,
                "--max-connections lowered to fit the open-file limit"
            );
            cap
        }
        _ => wanted,
    }
}

#[cfg(unix)]
fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
    Some(lim.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets every
/// open connection finish its in-flight request, and returns once they have closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (open_tx, open_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_full_log: Option<std::time::Instant> = None;
    loop {
        let quiet = last_full_log.is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if limits.permits.available_permits() == 0 && !quiet {
            tracing::warn!("connection limit reached: new clients wait until one closes");
            last_full_log = Some(std::time::Instant::now());
        }
        let permit = tokio::select! {
            p = limits.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, or the peer went away: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let open = open_rx.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let _open = open;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
}
