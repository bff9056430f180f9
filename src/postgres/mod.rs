//! PostgreSQL engine: a plain-text client on one side, an IAM-authenticated TLS session to
//! RDS on the other. `frontend` speaks to the client, `backend` to the server, `error` turns
//! failures into ErrorResponses, `cancel` routes CancelRequests to the owning upstream.

pub mod backend;
pub mod cancel;
pub mod error;
pub mod frontend;
pub mod wire;

use std::sync::Arc;

use crate::listener::ClientIo;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::failure::Failure;
use crate::proxy::{client_within, within, TargetRuntime};
use crate::relay::{relay, End, Relayed, Watch};
use crate::session::Session;
use cancel::CancelRegistry;
use frontend::Opening;

/// Serve one client connection to its end.
pub async fn serve(
    mut client: ClientIo,
    peer: String,
    target: Arc<TargetRuntime>,
    cancels: Arc<CancelRegistry>,
) {
    let mut session = Session::open(&target.cfg, peer, target.active.clone());
    let mut buf = BytesMut::with_capacity(1024);
    let mut secure = false;
    let outcome = match client_within(
        target.cfg.handshake_timeout,
        "the client did not send its startup message",
        frontend::read_opening(
            &mut client,
            &mut buf,
            target.client_tls.as_ref(),
            &mut secure,
        ),
    )
    .await
    {
        Ok(Opening::Startup(_)) if target.cfg.client_tls_required && !secure => {
            Err(Failure::ClientTlsRequired)
        }
        Ok(Opening::Startup(startup)) => {
            session.user = startup.parameters.get("user").cloned().unwrap_or_default();
            session.database = startup
                .parameters
                .get("database")
                .cloned()
                .or_else(|| target.cfg.database.clone())
                .unwrap_or_else(|| session.user.clone());
            session.opened();
            run(&mut client, &mut buf, startup, &session, &target, &cancels).await
        }
        Ok(Opening::Cancel { pid, secret }) => {
            cancels.forward(pid, &secret).await;
            Ok((Relayed::default(), None))
        }
        Ok(Opening::Closed) => Ok((Relayed::default(), None)),
        Err(f) => Err(f),
    };
    let failure = outcome
        .as_ref()
        .err()
        .map(|f| error::encode(f, &target.cfg));
    session.close(&outcome);
    if let Some(reply) = failure {
        error::send_raw(&mut client, &reply).await;
    }
}

async fn run(
    client: &mut ClientIo,
    client_buf: &mut BytesMut,
    startup: pgwire::messages::startup::Startup,
    session: &Session,
    target: &Arc<TargetRuntime>,
    cancels: &Arc<CancelRegistry>,
) -> Result<(Relayed, Option<String>), Failure> {
    if let Some(max) = target.over_limit() {
        return Err(Failure::Limit { max });
    }
    if session.user.is_empty() {
        return Err(Failure::ClientProtocol(
            "the startup message names no user".into(),
        ));
    }
    // The secret first: who the target serves is not told to strangers.
    if let Some(secret) = &target.client_secret {
        client_within(
            target.cfg.handshake_timeout,
            "the client did not finish its password exchange",
            frontend::authenticate(client, client_buf, secret.clone(), &session.user),
        )
        .await?;
    }
    if session.user != target.cfg.db_user {
        return Err(Failure::WrongUser {
            got: session.user.clone(),
            expected: target.cfg.db_user.clone(),
        });
    }
    let mut upstream = within(
        target.login_timeout(),
        "the database login did not finish",
        backend::connect(target, &startup, &session.database),
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
    session
        .meter
        .server_to_client
        .inc_by(upstream.to_client.len() as u64);
    session.ready();
    // Anything the client pipelined behind its startup message goes first.
    let mut boundaries = wire::Boundaries::default();
    let mut from_client = wire::Boundaries::default();
    let watch = Watch {
        up: Some(&mut from_client),
        down: Some(&mut boundaries),
        meter: Some(&session.meter),
        idle: target.cfg.idle_timeout,
    };
    let (mut relayed, end) = relay(client, &mut upstream.stream, client_buf, watch).await;
    relayed.server_to_client += upstream.to_client.len() as u64;
    // The server closing after the client's Terminate is the normal end.
    let end = match end {
        End::ServerClosed if from_client.terminated() => End::ClientClosed,
        other => other,
    };
    // Say why the session ends, if the client is still there and between two messages.
    let goodbye = match &end {
        _ if !boundaries.at_boundary() => None,
        End::ServerClosed | End::ServerError(_) => Some(Failure::ServerLost),
        End::Idle => Some(Failure::Idle(target.cfg.idle_timeout.unwrap_or_default())),
        _ => None,
    };
    if let Some(f) = goodbye {
        // Flushed and shut down, so it is not left in a TLS buffer.
        error::send_raw(client, &error::encode(&f, &target.cfg)).await;
    }
    Ok((relayed, end.error()))
}
