//! The client's side of the PostgreSQL handshake: refuse SSL/GSS encryption (the client is
//! local and plain), and read the StartupMessage or a CancelRequest.

use crate::listener::ClientIo;
use bytes::{Buf, Bytes, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::failure::Failure;

/// Like PostgreSQL: a startup packet may not exceed 10,000 bytes.
pub const MAX_STARTUP_LEN: usize = 10_000;
const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

pub enum Opening {
    Startup(Startup),
    Cancel {
        pid: i32,
        secret: Bytes,
    },
    /// The client hung up before sending anything (a port probe).
    Closed,
}

/// Read packets until a StartupMessage or a CancelRequest arrives.
/// With `tls`, an SSLRequest is answered 'S' and the client's stream becomes TLS; `secure`
/// tells whether it did.
pub async fn read_opening(
    client: &mut ClientIo,
    buf: &mut BytesMut,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    secure: &mut bool,
) -> Result<Opening, Failure> {
    loop {
        while buf.len() < 8 {
            let n = client
                .read_buf(buf)
                .await
                .map_err(|e| Failure::ClientProtocol(e.to_string()))?;
            if n == 0 {
                if buf.is_empty() {
                    return Ok(Opening::Closed);
                }
                return Err(Failure::ClientProtocol("incomplete startup packet".into()));
            }
        }
        let len = (&buf[0..4]).get_i32();
        let code = (&buf[4..8]).get_i32();
        if len < 8 || len as usize > MAX_STARTUP_LEN {
            return Err(Failure::ClientProtocol(format!(
                "invalid startup packet length {len}{}",
                if buf[0] == 0x16 {
                    " (this port speaks plain PostgreSQL; do not use TLS toward the proxy, e.g. sslmode=disable)"
                } else {
                    ""
                }
            )));
        }
        let len = len as usize;
        while buf.len() < len {
            let n = client
                .read_buf(buf)
                .await
                .map_err(|e| Failure::ClientProtocol(e.to_string()))?;
            if n == 0 {
                return Err(Failure::ClientProtocol("incomplete startup packet".into()));
            }
        }
        match code {
            SSL_REQUEST if tls.is_some() && !*secure => {
                buf.advance(len);
                if !buf.is_empty() {
                    // Bytes sent before our answer would bypass TLS (CVE-2021-23222).
                    return Err(Failure::ClientProtocol(
                        "received unencrypted data after the SSLRequest".into(),
                    ));
                }
                client
                    .write_all(b"S")
                    .await
                    .map_err(|e| Failure::ClientProtocol(e.to_string()))?;
                crate::listener::upgrade(client, tls.expect("checked"), BytesMut::new()).await?;
                *secure = true;
            }
            SSL_REQUEST | GSSENC_REQUEST => {
                buf.advance(len);
                // No TLS toward clients configured (or already on), and never GSS.
                client
                    .write_all(b"N")
                    .await
                    .map_err(|e| Failure::ClientProtocol(e.to_string()))?;
            }
            CANCEL_REQUEST => {
                // Keys are 4 bytes in protocol 3.0 and up to 256 in 3.2: decode as bytes.
                let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_2);
                let mut packet = buf.split_to(len);
                let msg = CancelRequest::decode(&mut packet, &ctx)
                    .map_err(|e| Failure::ClientProtocol(format!("bad CancelRequest: {e}")))?
                    .ok_or_else(|| Failure::ClientProtocol("incomplete CancelRequest".into()))?;
                return Ok(Opening::Cancel {
                    pid: msg.pid,
                    secret: msg.secret_key.to_bytes(),
                });
            }
            _ => {
                let major = (code >> 16) as u16;
                let minor = (code & 0xffff) as u16;
                if major != 3 {
                    return Err(Failure::ClientProtocol(format!(
                        "unsupported frontend protocol {major}.{minor}: the server supports 3.0 to 3.2"
                    )));
                }
                let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
                // Decode this packet only: bytes after it are the client's, not the startup's.
                let mut packet = buf.split_to(len);
                // pgwire would replace bad bytes silently; a user name must not change.
                if std::str::from_utf8(&packet[8..]).is_err() {
                    return Err(Failure::ClientProtocol(
                        "the startup parameters are not valid UTF-8".into(),
                    ));
                }
                let startup = Startup::decode(&mut packet, &ctx)
                    .map_err(|e| Failure::ClientProtocol(format!("bad startup packet: {e}")))?
                    .ok_or_else(|| Failure::ClientProtocol("incomplete startup packet".into()))?;
                return Ok(Opening::Startup(startup));
            }
        }
    }
}

/// Make the client prove the target's secret with SCRAM-SHA-256 (no channel binding).
pub async fn authenticate(
    client: &mut ClientIo,
    buf: &mut BytesMut,
    secret: std::sync::Arc<crate::client_auth::ClientSecret>,
    user: &str,
) -> Result<(), Failure> {
    use pgwire::messages::startup::Authentication;
    let send = |m: Authentication| {
        let mut out = BytesMut::new();
        let _ = m.encode(&mut out);
        out
    };
    let io = |e: std::io::Error| Failure::ClientProtocol(e.to_string());
    client
        .write_all(&send(Authentication::SASL(vec!["SCRAM-SHA-256".into()])))
        .await
        .map_err(io)?;
    let first = read_password_message(client, buf).await?;
    // SASLInitialResponse: mechanism, length, client-first-message.
    let name_end = first
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| Failure::ClientProtocol("bad SASLInitialResponse".into()))?;
    if &first[..name_end] != b"SCRAM-SHA-256" || first.len() < name_end + 5 {
        return Err(Failure::ClientProtocol("unsupported SASL mechanism".into()));
    }
    let data = &first[name_end + 5..];
    let (scram, server_first) =
        crate::client_auth::Scram::start(secret, data).map_err(Failure::ClientProtocol)?;
    client
        .write_all(&send(Authentication::SASLContinue(server_first.into())))
        .await
        .map_err(io)?;
    let last = read_password_message(client, buf).await?;
    match scram.finish(&last) {
        Ok(server_final) => {
            client
                .write_all(&send(Authentication::SASLFinal(server_final.into())))
                .await
                .map_err(io)?;
            Ok(())
        }
        Err(_) => Err(Failure::ClientAuth {
            user: user.to_string(),
        }),
    }
}

/// The body of the next 'p' message from the client.
async fn read_password_message(
    client: &mut ClientIo,
    buf: &mut BytesMut,
) -> Result<BytesMut, Failure> {
    let msg = super::wire::read_message(client, buf, MAX_STARTUP_LEN)
        .await
        .map_err(|e| Failure::ClientProtocol(e.to_string()))?
        .ok_or_else(|| Failure::ClientProtocol("the client left during authentication".into()))?;
    if msg[0] != b'p' {
        return Err(Failure::ClientProtocol(format!(
            "expected a password message, got '{}'",
            msg[0] as char
        )));
    }
    let mut msg = msg;
    msg.advance(5);
    Ok(msg)
}
