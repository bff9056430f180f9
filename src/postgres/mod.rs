//! PostgreSQL engine: a plain-text client on one side, an IAM-authenticated TLS session to
//! RDS on the other. `frontend` speaks to the client, `backend` to the server, `error` turns
//! failures into ErrorResponses, `cancel` routes CancelRequests to the owning upstream.

pub mod backend;
pub mod cancel;
pub mod error;
pub mod frontend;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::failure::Failure;
use crate::proxy::{within, TargetRuntime, CLIENT_HANDSHAKE_TIMEOUT};
use crate::relay::{relay, Relayed};
use cancel::CancelRegistry;
use frontend::Opening;

/// Serve one client connection to its end.
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    target: Arc<TargetRuntime>,
    cancels: Arc<CancelRegistry>,
) {
    let started = Instant::now();
    let mut buf = BytesMut::with_capacity(1024);
    let opening = within(
        CLIENT_HANDSHAKE_TIMEOUT,
        "the client did not send its startup message",
        frontend::read_opening(&mut client, &mut buf),
    )
    .await;
    let startup = match opening {
        Ok(Opening::Startup(s)) => s,
        Ok(Opening::Cancel { pid, secret }) => {
            cancels.forward(pid, &secret).await;
            return;
        }
        Ok(Opening::Closed) => return,
        Err(f) => {
            let outcome = Err(f);
            crate::proxy::log_closed(&target.cfg, peer, "", "", started, &outcome);
            if let Err(f) = outcome {
                error::send(&mut client, &f, &target.cfg).await;
            }
            return;
        }
    };
    let user = startup.parameters.get("user").cloned().unwrap_or_default();
    let database = startup
        .parameters
        .get("database")
        .cloned()
        .or_else(|| target.cfg.database.clone())
        .unwrap_or_else(|| user.clone());
    tracing::info!(target = %target.cfg.name, client = %peer, user = %user, database = %database, "connection opened");

    let outcome = session(
        &mut client,
        &mut buf,
        startup,
        &user,
        &database,
        &target,
        &cancels,
    )
    .await;
    crate::proxy::log_closed(&target.cfg, peer, &user, &database, started, &outcome);
    if let Err(f) = outcome {
        error::send(&mut client, &f, &target.cfg).await;
    }
}

async fn session(
    client: &mut TcpStream,
    client_buf: &mut BytesMut,
    startup: pgwire::messages::startup::Startup,
    user: &str,
    database: &str,
    target: &Arc<TargetRuntime>,
    cancels: &Arc<CancelRegistry>,
) -> Result<(Relayed, Option<String>), Failure> {
    if user.is_empty() {
        return Err(Failure::ClientProtocol(
            "the startup message names no user".into(),
        ));
    }
    if user != target.cfg.db_user {
        return Err(Failure::WrongUser {
            got: user.to_string(),
            expected: target.cfg.db_user.clone(),
        });
    }
    let mut upstream = within(
        target.login_timeout(),
        "the database login did not finish",
        backend::connect(target, &startup, database),
    )
    .await?;

    // Give the client a key of ours; a CancelRequest with it reaches this upstream.
    let _registration = match upstream.key.take() {
        Some((pid, secret)) => {
            let (reg, client_pid, client_secret) =
                cancels.register(target.clone(), upstream.peer, pid, secret);
            wire::rewrite_backend_key(&mut upstream.to_client, client_pid, client_secret);
            Some(reg)
        }
        None => None,
    };
    client
        .write_all(&upstream.to_client)
        .await
        .map_err(|e| Failure::ClientProtocol(format!("client went away: {e}")))?;
    // Anything the client pipelined behind its startup message goes first.
    let (mut relayed, end) = relay(client, &mut upstream.stream, client_buf, None).await;
    relayed.server_to_client += upstream.to_client.len() as u64;
    Ok((relayed, end.error()))
}
