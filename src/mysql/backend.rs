//! The server's side: read the greeting, SSLRequest and TLS (never a token in clear), a
//! HandshakeResponse as `db_user` carrying the client's database, character set and
//! connection attributes, and the token as the `mysql_clear_password` answer.

use std::collections::HashMap;

use bytes::BytesMut;
use mysql_common::constants::{CapabilityFlags, MariadbCapabilities};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{
    AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse, SslRequest,
};
use mysql_common::proto::MySerialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use zeroize::Zeroizing;

use super::error::parse_err;
use super::wire::{packet, read_packet, write_packet, COM_CHANGE_USER};
use crate::aws::Token;
use crate::failure::Failure;
use crate::proxy::TargetRuntime;

/// Handshake packets are small; anything bigger is a broken peer.
const MAX_HANDSHAKE_PACKET: usize = 1 << 20;

/// Flags the proxy never passes on: it does not compress, terminates TLS on each side on
/// its own, and the rest are client-side options that mean nothing to the peer.
pub const NOT_CARRIED: CapabilityFlags = CapabilityFlags::CLIENT_SSL
    .union(CapabilityFlags::CLIENT_COMPRESS)
    .union(CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM)
    .union(CapabilityFlags::CLIENT_SSL_VERIFY_SERVER_CERT)
    .union(CapabilityFlags::CLIENT_REMEMBER_OPTIONS);

/// Flags the login itself needs, whatever the client asked for.
const LOGIN: CapabilityFlags = CapabilityFlags::CLIENT_PROTOCOL_41
    .union(CapabilityFlags::CLIENT_SECURE_CONNECTION)
    .union(CapabilityFlags::CLIENT_PLUGIN_AUTH)
    .union(CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA);

/// What the client asked for, to be carried into the upstream login.
pub struct ClientLogin {
    pub capabilities: CapabilityFlags,
    pub mariadb_capabilities: MariadbCapabilities,
    pub collation: u8,
    pub max_packet_size: u32,
    pub database: Option<Vec<u8>>,
    pub attributes: Option<HashMap<String, String>>,
}

pub struct Upstream {
    pub stream: TlsStream<TcpStream>,
    /// The server's final OK payload, for the client.
    pub ok: BytesMut,
    /// The capabilities in force on the session.
    pub capabilities: CapabilityFlags,
}

/// Dial and read the greeting. The client sees nothing of the server before this works.
pub async fn greet(
    target: &TargetRuntime,
) -> Result<(TcpStream, HandshakePacket<'static>), Failure> {
    let cfg = &target.cfg;
    let addr = cfg.dial.as_str();
    let mut tcp = crate::upstream::dial(addr, cfg.connect_timeout).await?;
    let mut buf = BytesMut::with_capacity(256);
    let read = async {
        read_packet(&mut tcp, &mut buf, MAX_HANDSHAKE_PACKET)
            .await?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
    };
    let (_, payload) = crate::upstream::first_answer(
        addr,
        cfg.connect_timeout,
        "no greeting (is this a MySQL server?)",
        read,
    )
    .await?;
    let greeting = parse_greeting(&payload, addr)?;
    Ok((tcp, greeting))
}

/// Parse the server's greeting: an ERR (refused before the handshake), an old protocol or
/// no TLS are failures. Pure, so it can be fuzzed (tests/fuzz).
pub fn parse_greeting(payload: &[u8], addr: &str) -> Result<HandshakePacket<'static>, Failure> {
    if payload.first() == Some(&0xff) {
        // Refused before the handshake: too many connections, host blocked...
        return Err(Failure::ServerRefused(parse_err(
            payload,
            CapabilityFlags::CLIENT_PROTOCOL_41,
        )));
    }
    // mysql_common 0.38 computes `len as i8 - 8` on this byte and overflows (a panic in
    // debug builds) when it is 128 or more, as fuzzing found: refuse such a greeting first.
    let after_version = payload
        .get(1..)
        .and_then(|p| p.iter().position(|&b| b == 0));
    if let Some(v) = after_version {
        let at = 1 + v + 1 + 4 + 8 + 1 + 2 + 1 + 2 + 2;
        if payload.get(at).is_some_and(|&len| len >= 0x80) {
            return Err(Failure::UpstreamProtocol(format!(
                "{addr} sent a greeting with an impossible scramble length"
            )));
        }
    }
    let greeting: HandshakePacket<'_> = ParseBuf(payload).parse(()).map_err(|e| {
        Failure::UpstreamProtocol(format!("{addr} sent an unreadable greeting: {e}"))
    })?;
    let greeting = greeting.into_owned();
    let caps = greeting.capabilities();
    if greeting.protocol_version() != 10 || !caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
        return Err(Failure::UpstreamProtocol(format!(
            "{addr} speaks a MySQL protocol older than 4.1"
        )));
    }
    if !caps.contains(CapabilityFlags::CLIENT_SSL) {
        return Err(Failure::TlsRefused { addr: addr.into() });
    }
    Ok(greeting)
}

/// The capabilities of the upstream session: what the client asked for, within what the
/// server offers, plus what the login needs.
pub fn session_capabilities(client: CapabilityFlags, server: CapabilityFlags) -> CapabilityFlags {
    ((client - NOT_CARRIED) | LOGIN | CapabilityFlags::CLIENT_SSL) & server
}

/// TLS, then the login as `db_user` with the token.
pub async fn login(
    target: &TargetRuntime,
    mut tcp: TcpStream,
    greeting: &HandshakePacket<'_>,
    client: &ClientLogin,
) -> Result<Upstream, Failure> {
    let cfg = &target.cfg;
    let addr = cfg.dial.as_str();
    let server_caps = greeting.capabilities();
    let mut caps = session_capabilities(client.capabilities, server_caps);
    let attributes = if server_caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) {
        client.attributes.clone()
    } else {
        None
    };
    if attributes.is_none() {
        caps.remove(CapabilityFlags::CLIENT_CONNECT_ATTRS);
    }
    let maria = client.mariadb_capabilities & greeting.mariadb_ext_capabilities();
    let lost = |e: std::io::Error| {
        Failure::UpstreamProtocol(format!("connection to {addr} lost during the login: {e}"))
    };

    let mut ssl = Vec::new();
    SslRequest::new(caps, client.max_packet_size, client.collation)
        .with_mariadb_capabilities(maria)
        .serialize(&mut ssl);
    write_packet(&mut tcp, 1, &ssl).await.map_err(lost)?;
    let mut stream = crate::upstream::tls(tcp, target, addr).await?;

    // Fetched after the dial and TLS, so the token is as fresh as it can be when used.
    let token = target
        .tokens
        .token()
        .await
        .map_err(|e| Failure::Credentials(e.to_string()))?;
    let token = &*token;

    // The token goes in the first packet when it fits (length-encoded auth data);
    // otherwise the server's switch to mysql_clear_password asks for it.
    let lenenc = caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA);
    let answer = clear_password(token);
    let (auth, plugin): (&[u8], _) = if lenenc {
        (&answer, AuthPlugin::MysqlClearPassword)
    } else {
        (&[], AuthPlugin::MysqlNativePassword)
    };
    let response = HandshakeResponse::new(
        Some(auth),
        greeting.server_version_parsed().unwrap_or((8, 0, 0)),
        Some(cfg.db_user.as_bytes()),
        client.database.as_deref(),
        Some(plugin),
        caps,
        attributes,
        client.max_packet_size,
    )
    .with_mariadb_ext_capabilities(maria);
    let mut out = Zeroizing::new(Vec::new());
    response.serialize(&mut out);
    // HandshakeResponse::new picks the collation itself: carry the client's.
    out[8] = client.collation;
    stream.write_all(&packet(2, &out)).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;
    drop(out);

    let ok = authenticate(&mut stream, 3, token, lenenc, caps, &cfg.db_user).await?;
    Ok(Upstream {
        stream,
        ok,
        capabilities: caps,
    })
}

/// Follow the server's answers until OK: switch to clear password -> token; anything else
/// means the user is not an IAM user. Returns the OK payload.
async fn authenticate(
    stream: &mut TlsStream<TcpStream>,
    mut seq: u8,
    token: &Token,
    mut sent_token: bool,
    caps: CapabilityFlags,
    user: &str,
) -> Result<BytesMut, Failure> {
    let lost = |e: std::io::Error| {
        Failure::UpstreamProtocol(format!("connection lost during the login: {e}"))
    };
    let mut buf = BytesMut::with_capacity(512);
    let mut switched = false;
    loop {
        let Some((got_seq, payload)) = read_packet(stream, &mut buf, MAX_HANDSHAKE_PACKET)
            .await
            .map_err(lost)?
        else {
            return Err(Failure::UpstreamProtocol(
                "the server closed the connection during the login".into(),
            ));
        };
        if got_seq != seq {
            return Err(Failure::UpstreamProtocol(format!(
                "packet out of order during the login ({got_seq}, expected {seq})"
            )));
        }
        match payload.first() {
            Some(0x00) => return Ok(payload),
            Some(0xff) => {
                let e = parse_err(&payload, caps);
                return Err(if sent_token {
                    Failure::TokenRejected(e)
                } else {
                    Failure::ServerRefused(e)
                });
            }
            Some(0xfe) if payload.len() > 1 && !switched => {
                let switch: AuthSwitchRequest<'_> = ParseBuf(&payload).parse(()).map_err(|e| {
                    Failure::UpstreamProtocol(format!("unreadable auth switch: {e}"))
                })?;
                match switch.auth_plugin() {
                    // Aurora sends this switch with no plugin data; MariaDB with some.
                    AuthPlugin::MysqlClearPassword => {
                        seq = seq.wrapping_add(1);
                        let answer = clear_password(token);
                        stream
                            .write_all(&packet(seq, &answer))
                            .await
                            .map_err(lost)?;
                        stream.flush().await.map_err(lost)?;
                        sent_token = true;
                        switched = true;
                    }
                    other => {
                        return Err(Failure::NotIamUser {
                            user: user.into(),
                            method: String::from_utf8_lossy(other.as_bytes()).into_owned(),
                        })
                    }
                }
            }
            _ => {
                return Err(Failure::NotIamUser {
                    user: user.into(),
                    method: "an authentication exchange other than mysql_clear_password".into(),
                })
            }
        }
        seq = seq.wrapping_add(1);
    }
}

/// The mysql_clear_password answer: the token and its terminating NUL.
fn clear_password(token: &Token) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(Vec::with_capacity(token.value().len() + 1));
    v.extend_from_slice(token.value().as_bytes());
    v.push(0);
    v
}

/// COM_CHANGE_USER as `db_user` with a fresh token; returns the server's final OK or ERR
/// payload (the client gets it as the answer to its own COM_CHANGE_USER).
pub async fn change_user(
    stream: &mut TlsStream<TcpStream>,
    user: &str,
    database: &[u8],
    tail: &ChangeUserTail,
    caps: CapabilityFlags,
    token: &Token,
) -> Result<BytesMut, Failure> {
    // The auth data of COM_CHANGE_USER holds at most 255 bytes: announce a plugin the
    // IAM user does not have, so the server switches to mysql_clear_password for the token.
    let mut p = vec![COM_CHANGE_USER];
    p.extend_from_slice(user.as_bytes());
    p.push(0);
    p.push(0); // no auth data
    p.extend_from_slice(database);
    p.push(0);
    if let Some(charset) = tail.charset {
        p.extend_from_slice(&charset.to_le_bytes());
        if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) {
            p.extend_from_slice(b"mysql_native_password\0");
        }
        if caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) {
            if let Some(attrs) = &tail.attributes {
                p.extend_from_slice(attrs);
            }
        }
    }
    let lost = |e: std::io::Error| {
        Failure::UpstreamProtocol(format!("connection lost during COM_CHANGE_USER: {e}"))
    };
    stream.write_all(&packet(0, &p)).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;
    match authenticate(stream, 1, token, false, caps, user).await {
        Ok(ok) => Ok(ok),
        Err(Failure::TokenRejected(e)) | Err(Failure::ServerRefused(e)) => {
            Err(Failure::TokenRejected(e))
        }
        Err(other) => Err(other),
    }
}

/// What follows the database in a COM_CHANGE_USER.
#[derive(Default, Debug)]
pub struct ChangeUserTail {
    pub charset: Option<u16>,
    /// The length-encoded attribute block, raw.
    pub attributes: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by tests/fuzz (mysql_handshake): a scramble length of 0x81 made mysql_common
    /// overflow.
    #[test]
    fn a_greeting_with_a_huge_scramble_length_is_refused_not_a_panic() {
        let crash: &[u8] = &[
            10, 53, 46, 48, 46, 49, 45, 53, 53, 46, 49, 49, 46, 49, 57, 45, 77, 97, 114, 105, 97,
            68, 66, 0, 7, 0, 0, 2, 0, 0, 0, 0, 0, 0, 128, 104, 83, 254, 255, 45, 2, 0, 255, 130,
            129, 21, 0, 0, 0, 0, 0, 0, 29, 0, 0, 0, 105, 106, 107, 108, 109, 110, 111, 112, 113,
            114, 77, 0, 0, 0, 0, 0, 0, 0, 95, 110, 97, 116, 105, 118, 101, 95, 112, 97, 115, 115,
            119, 111, 114, 100, 0,
        ];
        assert!(matches!(
            parse_greeting(crash, "x:3306"),
            Err(Failure::UpstreamProtocol(_))
        ));
    }
}
