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
use crate::proxy::TargetRuntime;
use crate::relay::{relay, End, Relayed};
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
    let opening = match frontend::read_opening(&mut client, &mut buf).await {
        Ok(o) => o,
        Err(f) => {
            tracing::info!(target = %target.cfg.name, client = %peer, result = f.kind(), error = %f, "connection refused");
            error::send(&mut client, &f, &target.cfg).await;
            return;
        }
    };
    let startup = match opening {
        Opening::Cancel { pid, secret } => {
            cancels.forward(pid, &secret).await;
            return;
        }
        Opening::Closed => return,
        Opening::Startup(s) => s,
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
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok((relayed, io_error)) => tracing::info!(
            target = %target.cfg.name, client = %peer, user = %user, database = %database,
            duration_ms = elapsed_ms, bytes_from_client = relayed.client_to_server,
            bytes_to_client = relayed.server_to_client, result = "ok",
            error = io_error,
            "connection closed"
        ),
        Err(f) => {
            tracing::warn!(
                target = %target.cfg.name, client = %peer, user = %user, database = %database,
                duration_ms = elapsed_ms, result = f.kind(), error = %f,
                "connection closed"
            );
            error::send(&mut client, &f, &target.cfg).await;
        }
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
    let token = target
        .tokens
        .token()
        .await
        .map_err(|e| Failure::Credentials(e.to_string()))?;
    let mut upstream = backend::connect(target, &startup, database, &token).await?;
    drop(token);

    // Give the client a key of ours; a CancelRequest with it reaches this upstream.
    let _registration = match upstream.key.take() {
        Some((pid, secret)) => {
            let (reg, client_pid, client_secret) = cancels.register(target.clone(), pid, secret);
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
    let err = match end {
        End::Closed | End::Handover(_) => None,
        End::ClientError(e) => Some(format!("client: {e}")),
        End::ServerError(e) => Some(format!("server: {e}")),
    };
    Ok((relayed, err))
}
