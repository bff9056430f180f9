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
/// One packet of the opening, as parsed from a buffer.
#[derive(Debug)]
pub enum Packet {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Bytes },
    Startup(Startup),
}

/// Parse the next opening packet from `buf` (consuming it); `Ok(None)` until it is whole.
/// Pure, so it can be fuzzed (tests/fuzz).
pub fn parse_opening(buf: &mut BytesMut) -> Result<Option<Packet>, Failure> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = (&buf[0..4]).get_i32();
    let code = (&buf[4..8]).get_i32();
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(Failure::ClientProtocol(format!(
            "invalid startup packet length {len}{}",
            if buf[0] == 0x16 {
                " (a TLS handshake: do not use TLS toward the proxy unless the target has client_tls_cert, e.g. sslmode=disable)"
            } else {
                ""
            }
        )));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    match code {
        SSL_REQUEST if len == 8 => Ok(Some(Packet::SslRequest)),
        GSSENC_REQUEST if len == 8 => Ok(Some(Packet::GssEncRequest)),
        SSL_REQUEST | GSSENC_REQUEST => Err(Failure::ClientProtocol(format!(
            "encryption request of {len} bytes (8 expected)"
        ))),
        CANCEL_REQUEST => {
            // Keys are 4 bytes in protocol 3.0 and up to 256 in 3.2: decode as bytes.
            let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_2);
            let msg = CancelRequest::decode(&mut packet, &ctx)
                .map_err(|e| Failure::ClientProtocol(format!("bad CancelRequest: {e}")))?
                .ok_or_else(|| Failure::ClientProtocol("incomplete CancelRequest".into()))?;
            Ok(Some(Packet::Cancel {
                pid: msg.pid,
                secret: msg.secret_key.to_bytes(),
            }))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(Failure::ClientProtocol(format!(
                    "unsupported frontend protocol {major}.{minor}: the server supports 3.0 to 3.2"
                )));
            }
            // pgwire would replace bad bytes silently; a user name must not change.
            if std::str::from_utf8(&packet[8..]).is_err() {
                return Err(Failure::ClientProtocol(
                    "the startup parameters are not valid UTF-8".into(),
                ));
            }
            let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
            let startup = Startup::decode(&mut packet, &ctx)
                .map_err(|e| Failure::ClientProtocol(format!("bad startup packet: {e}")))?
                .ok_or_else(|| Failure::ClientProtocol("incomplete startup packet".into()))?;
            Ok(Some(Packet::Startup(startup)))
        }
    }
}

/// Read packets until a StartupMessage or a CancelRequest arrives. With `tls`, an
/// SSLRequest is answered 'S' and the client's stream becomes TLS; `secure` tells whether
/// it did. Other encryption requests are answered 'N'.
pub async fn read_opening(
    client: &mut ClientIo,
    buf: &mut BytesMut,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    secure: &mut bool,
) -> Result<Opening, Failure> {
    let io = |e: std::io::Error| Failure::ClientProtocol(e.to_string());
    loop {
        let packet = match parse_opening(buf)? {
            Some(p) => p,
            None => {
                if client.read_buf(buf).await.map_err(io)? == 0 {
                    if buf.is_empty() {
                        return Ok(Opening::Closed);
                    }
                    return Err(Failure::ClientProtocol("incomplete startup packet".into()));
                }
                continue;
            }
        };
        match packet {
            Packet::SslRequest if tls.is_some() && !*secure => {
                if !buf.is_empty() {
                    // Bytes sent before our answer would bypass TLS (CVE-2021-23222).
                    return Err(Failure::ClientProtocol(
                        "received unencrypted data after the SSLRequest".into(),
                    ));
                }
                client.write_all(b"S").await.map_err(io)?;
                crate::listener::upgrade(client, tls.expect("checked"), BytesMut::new()).await?;
                *secure = true;
            }
            // No TLS toward clients configured (or already on), and never GSS.
            Packet::SslRequest | Packet::GssEncRequest => {
                client.write_all(b"N").await.map_err(io)?
            }
            Packet::Cancel { pid, secret } => return Ok(Opening::Cancel { pid, secret }),
            Packet::Startup(s) => return Ok(Opening::Startup(s)),
        }
    }
}

/// The client-first-message of a SASLInitialResponse body, if it names SCRAM-SHA-256.
pub fn parse_sasl_initial(body: &[u8]) -> Result<&[u8], Failure> {
    let name_end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| Failure::ClientProtocol("bad SASLInitialResponse".into()))?;
    if &body[..name_end] != b"SCRAM-SHA-256" {
        return Err(Failure::ClientProtocol("unsupported SASL mechanism".into()));
    }
    let rest = &body[name_end + 1..];
    if rest.len() < 4 {
        return Err(Failure::ClientProtocol("bad SASLInitialResponse".into()));
    }
    let len = i32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(Failure::ClientProtocol(
            "bad SASLInitialResponse length".into(),
        ));
    }
    Ok(data)
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
    let data = parse_sasl_initial(&first)?;
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
