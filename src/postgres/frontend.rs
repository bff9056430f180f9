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
pub async fn read_opening(client: &mut ClientIo, buf: &mut BytesMut) -> Result<Opening, Failure> {
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
            SSL_REQUEST | GSSENC_REQUEST => {
                buf.advance(len);
                // The proxy listens for local plain clients: no encryption here.
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
