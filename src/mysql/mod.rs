//! MySQL engine (MySQL, MariaDB, Aurora MySQL): a plain client on one side, an
//! IAM-authenticated TLS session on the other. The upstream is dialed first so the client's
//! greeting can mirror the server's; `frontend` speaks to the client, `backend` to the server,
//! `error` turns failures into ERR packets, `wire` frames packets.

pub mod backend;
pub mod error;
pub mod frontend;
pub mod wire;

use std::sync::Arc;

use crate::listener::ClientIo;
use bytes::BytesMut;
use mysql_common::io::ParseBuf;
use tokio::io::AsyncWriteExt;

use crate::failure::Failure;
use crate::proxy::{client_within, within, TargetRuntime};
use crate::relay::{relay, End, Relayed, Watch};
use crate::session::Session;
use backend::ChangeUserTail;
use wire::{packet, read_packet, ChangeUserWatch, ServerActivity};

/// Serve one client connection to its end.
pub async fn serve(mut client: ClientIo, peer: String, target: Arc<TargetRuntime>) {
    let mut session = Session::open(&target.cfg, peer, target.active.clone());
    // The sequence id our next packet to the client must carry.
    let mut seq = 0u8;
    let outcome = run(&mut client, &target, &mut session, &mut seq).await;
    let failure = outcome
        .as_ref()
        .err()
        .map(|f| error::encode(f, &target.cfg, seq));
    session.close(&outcome);
    if let Some(reply) = failure {
        let _ = client.write_all(&reply).await;
        let _ = client.shutdown().await;
    }
}

async fn run(
    client: &mut ClientIo,
    target: &Arc<TargetRuntime>,
    session: &mut Session,
    seq: &mut u8,
) -> Result<(Relayed, Option<String>), Failure> {
    let cfg = &target.cfg;
    if let Some(max) = target.over_limit() {
        // Like the server: ERR 1040 in place of the greeting.
        return Err(Failure::Limit { max });
    }
    let (tcp, greeting) = within(
        target.login_timeout(),
        "the server's greeting did not come",
        backend::greet(target),
    )
    .await?;
    let (hello, offered, nonce) = frontend::greeting(&greeting, target.client_tls.is_some());
    client
        .write_all(&packet(0, &hello))
        .await
        .map_err(|e| Failure::ClientProtocol(format!("client went away: {e}")))?;
    *seq = 1;
    let mut buf = BytesMut::with_capacity(1024);
    let mut secure = false;
    let response = client_within(
        target.cfg.handshake_timeout,
        "the client did not answer the greeting",
        frontend::read_response(
            client,
            &mut buf,
            offered,
            target.client_tls.as_ref(),
            &mut secure,
        ),
    )
    .await?;
    *seq = response.seq.wrapping_add(1);
    session.user = response.user.clone();
    session.database = response
        .login
        .database
        .as_deref()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .unwrap_or_default();
    session.opened();
    // Password checks only ever run inside TLS.
    if (cfg.client_tls_required || target.client_secret.is_some()) && !secure {
        return Err(Failure::ClientTlsRequired);
    }
    // The secret first: who the target serves is not told to strangers.
    if let Some(secret) = &target.client_secret {
        client_within(
            cfg.handshake_timeout,
            "the client did not finish its password exchange",
            frontend::authenticate(client, &mut buf, seq, secret, &nonce, &response),
        )
        .await?;
    }
    if response.user != cfg.db_user {
        return Err(Failure::WrongUser {
            got: response.user,
            expected: cfg.db_user.clone(),
        });
    }
    let mut login = response.login;
    if login.database.is_none() {
        login.database = cfg.database.as_ref().map(|d| d.as_bytes().to_vec());
    }
    let mut upstream = within(
        target.login_timeout(),
        "the database login did not finish",
        backend::login(target, tcp, &greeting, &login),
    )
    .await?;
    let ok = packet(*seq, &upstream.ok);
    client
        .write_all(&ok)
        .await
        .map_err(|e| Failure::ClientProtocol(format!("client went away: {e}")))?;
    session.meter.server_to_client.inc_by(ok.len() as u64);
    session.ready();

    // Relay; take over only for COM_CHANGE_USER, then go on relaying.
    let mut total = Relayed {
        client_to_server: 0,
        server_to_client: ok.len() as u64,
    };
    let mut pending = buf;
    loop {
        let mut change_user_watch = ChangeUserWatch::default();
        let mut server_activity = ServerActivity(change_user_watch.server_spoke.clone());
        let watch = Watch {
            up: Some(&mut change_user_watch),
            down: Some(&mut server_activity),
            meter: Some(&session.meter),
            idle: cfg.idle_timeout,
        };
        let (moved, end) = relay(client, &mut upstream.stream, &pending, watch).await;
        total.client_to_server += moved.client_to_server;
        total.server_to_client += moved.server_to_client;
        match end {
            End::Handover(mut rest) => {
                let Some((_, command)) = read_packet(client, &mut rest, frontend::MAX_RESPONSE)
                    .await
                    .map_err(|e| Failure::ClientProtocol(format!("COM_CHANGE_USER: {e}")))?
                else {
                    return Ok((total, None));
                };
                let (reply, broken) =
                    change_user(target, &mut upstream, &command, &mut session.user).await;
                client
                    .write_all(&packet(1, &reply))
                    .await
                    .map_err(|e| Failure::ClientProtocol(format!("client went away: {e}")))?;
                if broken {
                    return Ok((
                        total,
                        Some("the server connection broke during COM_CHANGE_USER".into()),
                    ));
                }
                pending = rest;
            }
            // COM_QUIT: the server closing is the normal end.
            End::ServerClosed if change_user_watch.last_command == 0x01 => {
                return Ok((total, None))
            }
            other => return Ok((total, other.error())),
        }
    }
}

/// Answer a client's COM_CHANGE_USER: re-authenticate the same session with a fresh token,
/// or refuse it with an ERR while the session stays as it was. Returns the reply payload,
/// and whether the server connection is broken (then the session ends after the reply).
async fn change_user(
    target: &TargetRuntime,
    upstream: &mut backend::Upstream,
    command: &[u8],
    session_user: &mut String,
) -> (Vec<u8>, bool) {
    let cfg = &target.cfg;
    let refuse = |f: &Failure| {
        let (errno, state, message) = error::describe(f, cfg);
        error::err_payload(errno, &state, &message)
    };
    let Some((user, db, tail)) = parse_change_user(command) else {
        return (
            refuse(&Failure::ClientProtocol(
                "unreadable COM_CHANGE_USER".into(),
            )),
            false,
        );
    };
    if user != cfg.db_user {
        tracing::warn!(target = %cfg.name, user = %user, "COM_CHANGE_USER to another user refused");
        return (
            refuse(&Failure::WrongUser {
                got: user,
                expected: cfg.db_user.clone(),
            }),
            false,
        );
    }
    let token = match target.tokens.token().await {
        Ok(t) => t,
        Err(e) => return (refuse(&Failure::Credentials(e.to_string())), false),
    };
    let exchange = backend::change_user(
        &mut upstream.stream,
        &cfg.db_user,
        &db,
        &tail,
        upstream.capabilities,
        &token,
    );
    match within(
        target.login_timeout(),
        "COM_CHANGE_USER did not finish",
        exchange,
    )
    .await
    {
        Ok(ok) => {
            tracing::info!(target = %cfg.name, user = %user, "COM_CHANGE_USER re-authenticated with a fresh token");
            *session_user = user;
            (ok.to_vec(), false)
        }
        Err(f) => {
            tracing::warn!(target = %cfg.name, error = %f, "COM_CHANGE_USER failed");
            let broken = matches!(f, Failure::Timeout(_) | Failure::UpstreamProtocol(_));
            (refuse(&f), broken)
        }
    }
}

/// (user, database, tail) of a COM_CHANGE_USER payload. mysql_common's ComChangeUser has no
/// getters, so the few fields are read here.
pub fn parse_change_user(p: &[u8]) -> Option<(String, Vec<u8>, ChangeUserTail)> {
    let mut b = ParseBuf(p.get(1..)?);
    let user = null_str(&mut b)?;
    let _client_auth = b.checked_eat_u8_str()?;
    let db = null_str(&mut b)?.to_vec();
    let mut tail = ChangeUserTail::default();
    if b.len() >= 2 {
        tail.charset = Some(b.checked_eat_u16_le()?);
        let _plugin = null_str(&mut b);
        if !b.is_empty() {
            tail.attributes = Some(b.eat_all().to_vec());
        }
    }
    Some((String::from_utf8(user.to_vec()).ok()?, db, tail))
}

fn null_str<'a>(b: &mut ParseBuf<'a>) -> Option<&'a [u8]> {
    let pos = b.0.iter().position(|&c| c == 0)?;
    let s = b.eat(pos);
    b.skip(1);
    Some(s)
}
