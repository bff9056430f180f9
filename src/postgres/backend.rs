//! The server's side: TLS to RDS, StartupMessage as `db_user`, the token as the cleartext
//! password, then everything up to ReadyForQuery collected for the client.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::messages::startup::{Authentication, Startup};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::wire::read_message;
use crate::failure::{Failure, ServerError};
use crate::proxy::TargetRuntime;

/// Server messages during the handshake are small; anything bigger is a broken peer.
const MAX_HANDSHAKE_MESSAGE: usize = 1 << 20;

pub struct Upstream {
    pub stream: TlsStream<TcpStream>,
    /// The server's address, for routing CancelRequests to this very server.
    pub peer: std::net::SocketAddr,
    /// AuthenticationOk .. ReadyForQuery (and anything after), raw, for the client.
    pub to_client: BytesMut,
    /// The server's cancel key (pid, secret).
    pub key: Option<(i32, Bytes)>,
}

/// Dial (`cfg.dial`, or `addr` when given), ask for TLS, and complete the TLS handshake
/// for the endpoint name. The token is sent only over this.
pub async fn open_tls(
    target: &TargetRuntime,
    addr: Option<std::net::SocketAddr>,
) -> Result<TlsStream<TcpStream>, Failure> {
    let cfg = &target.cfg;
    let addr_text = addr.map(|a| a.to_string());
    let addr = addr_text.as_deref().unwrap_or(cfg.dial.as_str());
    let mut tcp = crate::upstream::dial(addr, cfg.connect_timeout).await?;
    let mut req = BytesMut::with_capacity(8);
    req.put_i32(8);
    req.put_i32(80877103);
    let mut answer = [0u8; 1];
    let exchange = async {
        tcp.write_all(&req).await?;
        tcp.read_exact(&mut answer).await
    };
    crate::upstream::first_answer(
        addr,
        cfg.connect_timeout,
        "no answer to SSLRequest (is this a PostgreSQL server?)",
        exchange,
    )
    .await?;
    match answer[0] {
        b'S' => {}
        b'N' => {
            return Err(Failure::TlsRefused {
                addr: addr.to_string(),
            })
        }
        other => {
            return Err(Failure::UpstreamProtocol(format!(
                "{addr} answered SSLRequest with byte 0x{other:02x}; is it a PostgreSQL server?"
            )))
        }
    }
    crate::upstream::tls(tcp, target, addr).await
}

/// Open an authenticated session for the client's startup parameters.
pub async fn connect(
    target: &TargetRuntime,
    client_startup: &Startup,
    database: &str,
) -> Result<Upstream, Failure> {
    let cfg = &target.cfg;
    let mut stream = open_tls(target, None).await?;
    let peer = stream
        .get_ref()
        .0
        .peer_addr()
        .map_err(|e| Failure::UpstreamProtocol(e.to_string()))?;
    // Fetched after the dial and TLS, so the token is as fresh as it can be when used.
    let token = target
        .tokens
        .token()
        .await
        .map_err(|e| Failure::Credentials(e.to_string()))?;

    let mut startup = Startup::new();
    startup.protocol_number_major = client_startup.protocol_number_major;
    startup.protocol_number_minor = client_startup.protocol_number_minor;
    startup.parameters = client_startup.parameters.clone();
    startup
        .parameters
        .insert("user".into(), cfg.db_user.clone());
    startup
        .parameters
        .insert("database".into(), database.to_string());
    let mut out = BytesMut::new();
    startup
        .encode(&mut out)
        .map_err(|e| Failure::ClientProtocol(format!("startup parameters: {e}")))?;
    let lost =
        |e: std::io::Error| Failure::UpstreamProtocol(format!("connection lost during login: {e}"));
    stream.write_all(&out).await.map_err(lost)?;

    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    let mut buf = BytesMut::with_capacity(4096);
    let mut to_client = BytesMut::new();
    let mut sent_token = false;
    let mut authenticated = false;
    let mut key = None;
    loop {
        let Some(msg) = read_message(&mut stream, &mut buf, MAX_HANDSHAKE_MESSAGE)
            .await
            .map_err(lost)?
        else {
            return Err(Failure::UpstreamProtocol(
                "the server closed the connection during login".into(),
            ));
        };
        match msg[0] {
            b'R' if !authenticated => {
                let mut m = msg.clone();
                let auth = match Authentication::decode(&mut m, &ctx) {
                    Ok(Some(a)) => a,
                    // GSS, SSPI and other codes pgwire does not model: still not IAM.
                    _ => {
                        let code = if msg.len() >= 9 {
                            (&msg[5..9]).get_i32()
                        } else {
                            -1
                        };
                        return Err(Failure::NotIamUser {
                            user: cfg.db_user.clone(),
                            method: format!("authentication method {code}"),
                        });
                    }
                };
                match auth {
                    Authentication::CleartextPassword if !sent_token => {
                        let mut pw = password_message(token.value());
                        let sent = stream.write_all(&pw).await;
                        pw.iter_mut().for_each(|b| *b = 0);
                        sent.map_err(lost)?;
                        sent_token = true;
                    }
                    Authentication::Ok => {
                        authenticated = true;
                        to_client.extend_from_slice(&msg);
                    }
                    other => {
                        return Err(Failure::NotIamUser {
                            user: cfg.db_user.clone(),
                            method: auth_name(&other),
                        })
                    }
                }
            }
            b'E' if !authenticated => {
                let fields = super::error::parse_fields(&msg);
                let e = ServerError {
                    message: fields.get(&b'M').cloned().unwrap_or_default(),
                    code: fields.get(&b'C').cloned().unwrap_or_else(|| "28000".into()),
                    errno: 0,
                };
                if sent_token {
                    return Err(Failure::TokenRejected(e));
                }
                // Refused before any password was asked (too many connections, pg_hba):
                // the server's words are the most useful.
                return Err(Failure::ServerRefused(e));
            }
            b'K' => {
                let mut body = msg.clone();
                body.advance(5);
                if body.len() >= 8 {
                    let pid = body.get_i32();
                    key = Some((pid, body.copy_to_bytes(body.len())));
                }
                to_client.extend_from_slice(&msg);
            }
            b'Z' => {
                to_client.extend_from_slice(&msg);
                // Bytes already read past ReadyForQuery belong to the client too.
                to_client.extend_from_slice(&buf);
                return Ok(Upstream {
                    stream,
                    peer,
                    to_client,
                    key,
                });
            }
            b'E' => {
                // An error after authentication (e.g. no such database): the client gets it.
                to_client.extend_from_slice(&msg);
                let reason = super::error::parse_fields(&msg)
                    .remove(&b'M')
                    .unwrap_or_default();
                return Err(Failure::Forward {
                    raw: to_client.freeze(),
                    reason,
                });
            }
            _ => to_client.extend_from_slice(&msg),
        }
    }
}

fn password_message(token: &str) -> BytesMut {
    let mut m = BytesMut::with_capacity(token.len() + 6);
    m.put_u8(b'p');
    m.put_i32((4 + token.len() + 1) as i32);
    m.put_slice(token.as_bytes());
    m.put_u8(0);
    m
}

fn auth_name(a: &Authentication) -> String {
    match a {
        Authentication::MD5Password(_) => "MD5 password authentication".into(),
        Authentication::SASL(mechs) => format!("SASL authentication ({})", mechs.join(", ")),
        Authentication::KerberosV5 => "Kerberos authentication".into(),
        Authentication::CleartextPassword => "a second password".into(),
        _ => "an unexpected authentication method".into(),
    }
}
