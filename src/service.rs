//! The `run` command as a service: bind, mint the first tokens, tell systemd, serve the
//! admin endpoint, reload on SIGHUP, and on SIGTERM/SIGINT stop accepting and let open
//! sessions finish within the grace period (a second signal exits at once).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::admin::Health;
use crate::config::Config;
use crate::metrics::{metrics, ResultLabels};
use crate::proxy::Proxy;
use crate::systemd::notify;

/// Each client costs two descriptors (client and upstream): lift the soft limit to the hard
/// one, as servers do, so the default 1,024 does not cap the proxy near 500 clients.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                tracing::debug!(
                    from = lim.rlim_cur,
                    to = lim.rlim_max,
                    "raised the open-files limit"
                );
            }
        }
    }
}

pub async fn run(path: PathBuf, config: Config) -> ExitCode {
    raise_fd_limit();
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("rds-iam-proxy: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let proxy = Proxy::new();
    if let Err(e) = proxy.apply(&config).await {
        eprintln!("rds-iam-proxy: {e}");
        return ExitCode::FAILURE;
    }
    let health = Arc::new(Health {
        proxy: proxy.clone(),
        started: Default::default(),
        stopping: Default::default(),
    });
    if let Some(addr) = config.admin_listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(listen = %addr, "admin endpoint: /metrics /startup /liveness /readiness");
                tokio::spawn(crate::admin::serve(l, health.clone()));
            }
            Err(e) => {
                eprintln!("rds-iam-proxy: cannot listen on [admin] {addr}: {e}; pick a free port, or set [admin] enabled = false");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut config = config;
    notify(&format!(
        "STATUS=minting the first tokens for {} targets",
        config.targets.len()
    ));
    crate::systemd::spawn_watchdog();

    // Not ready before every target has a token: a client must not wait for STS.
    let warm = proxy.warm_up();
    tokio::pin!(warm);
    loop {
        tokio::select! {
            _ = &mut warm => break,
            _ = term.recv() => return ExitCode::SUCCESS,
            _ = int.recv() => return ExitCode::SUCCESS,
            _ = hup.recv() => reload(&proxy, &path, &mut config).await,
        }
    }
    health.started.store(true, Ordering::SeqCst);
    notify(&format!(
        "READY=1\nSTATUS=serving {} targets",
        config.targets.len()
    ));
    tracing::info!(targets = config.targets.len(), "ready");

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&proxy, &path, &mut config).await,
        }
    }

    health.stopping.store(true, Ordering::SeqCst);
    proxy.stop_accepting().await;
    let open = proxy.open_sessions();
    let grace = config.shutdown_grace;
    notify(&format!("STOPPING=1\nSTATUS=draining {open} sessions"));
    tracing::info!(
        open_sessions = open,
        grace_s = grace.as_secs(),
        "stopping: no new connections; open sessions may finish"
    );
    tokio::select! {
        done = proxy.drain(grace) => {
            if done {
                tracing::info!("all sessions ended; exiting");
            } else {
                tracing::warn!(open_sessions = proxy.open_sessions(), "grace period over; closing the remaining sessions");
            }
        }
        _ = term.recv() => tracing::warn!("second signal: exiting at once"),
        _ = int.recv() => tracing::warn!("second signal: exiting at once"),
    }
    ExitCode::SUCCESS
}

/// Read the config again and apply it; an invalid one is refused and the old one stays.
async fn reload(proxy: &Arc<Proxy>, path: &Path, current: &mut Config) {
    let outcome = match Config::load(path) {
        Ok(new) => proxy.apply(&new).await.map(|_| new),
        Err(e) => Err(e.to_string()),
    };
    let result = match outcome {
        Ok(new) => {
            tracing::info!(targets = new.targets.len(), "configuration reloaded");
            notify(&format!(
                "STATUS=serving {} targets (reloaded)",
                new.targets.len()
            ));
            // The admin address and worker threads are read at start only.
            *current = Config {
                admin_listen: current.admin_listen,
                worker_threads: current.worker_threads,
                ..new
            };
            "ok"
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration reload refused; the previous configuration stays");
            "error"
        }
    };
    metrics()
        .config_reloads
        .get_or_create(&ResultLabels {
            result: result.into(),
        })
        .inc();
}
