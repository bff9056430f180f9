//! The client's side of the MySQL handshake: a greeting built from the upstream's (its
//! version, thread id and status; its capabilities less what the proxy does not carry), and
//! the client's HandshakeResponse, whatever auth plugin it used.

use crate::listener::ClientIo;
use bytes::BytesMut;
use mysql_common::constants::{CapabilityFlags, MariadbCapabilities};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{HandshakePacket, HandshakeResponse};
use mysql_common::proto::MySerialize;

use super::backend::{ClientLogin, NOT_CARRIED};
use super::wire::read_packet;
use crate::failure::Failure;

/// A HandshakeResponse is small; PostgreSQL caps its startup packet at 10,000 bytes too.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// MariaDB extensions relayed faithfully once both sides agree on them.
const MARIADB_CARRIED: MariadbCapabilities = MariadbCapabilities::MARIADB_CLIENT_PROGRESS
    .union(MariadbCapabilities::MARIADB_CLIENT_STMT_BULK_OPERATIONS)
    .union(MariadbCapabilities::MARIADB_CLIENT_EXTENDED_METADATA)
    .union(MariadbCapabilities::MARIADB_CLIENT_CACHE_METADATA)
    .union(MariadbCapabilities::MARIADB_CLIENT_BULK_UNIT_RESULTS);

/// The greeting for the client, the capabilities it offers, and its 20-byte nonce. TLS is
/// offered only when the target has a certificate for clients.
pub fn greeting(upstream: &HandshakePacket<'_>, tls: bool) -> (Vec<u8>, CapabilityFlags, [u8; 20]) {
    let mut offered = (upstream.capabilities() - NOT_CARRIED) | CapabilityFlags::CLIENT_PLUGIN_AUTH;
    if tls {
        offered |= CapabilityFlags::CLIENT_SSL;
    }
    let nonce: [u8; 20] = std::array::from_fn(|_| rand::random::<u8>() % 94 + 33);
    let mut part2 = nonce[8..].to_vec();
    part2.push(0);
    let packet = HandshakePacket::new(
        10,
        upstream.server_version_ref(),
        // The server's thread id, so KILL QUERY and CONNECTION_ID() mean the same thing.
        upstream.connection_id(),
        nonce[..8].try_into().expect("8 bytes"),
        Some(part2),
        offered,
        upstream.default_collation(),
        upstream.status_flags(),
        Some(&b"mysql_native_password"[..]),
    )
    .with_mariadb_ext_capabilities(upstream.mariadb_ext_capabilities() & MARIADB_CARRIED);
    let mut out = Vec::new();
    packet.serialize(&mut out);
    (out, offered, nonce)
}

pub struct ClientHello {
    pub seq: u8,
    pub user: String,
    pub login: ClientLogin,
    /// The client's auth plugin and its answer to our nonce (checked only when the target
    /// has a client secret).
    pub plugin: Vec<u8>,
    pub auth: Vec<u8>,
}

/// Read the client's HandshakeResponse.
async fn next_packet(client: &mut ClientIo, buf: &mut BytesMut) -> Result<(u8, BytesMut), Failure> {
    match read_packet(client, buf, MAX_RESPONSE).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(Failure::ClientProtocol(
            "the client closed the connection during the handshake".into(),
        )),
        Err(e) => Err(Failure::ClientProtocol(e.to_string())),
    }
}

/// Read the client's HandshakeResponse; with `tls`, an SSLRequest first turns the stream
/// into TLS (`secure` tells whether it did).
pub async fn read_response(
    client: &mut ClientIo,
    buf: &mut BytesMut,
    offered: CapabilityFlags,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    secure: &mut bool,
) -> Result<ClientHello, Failure> {
    let (mut seq, mut payload) = next_packet(client, buf).await?;
    if is_ssl_request(&payload) {
        let Some(acceptor) = tls else {
            return Err(Failure::ClientProtocol(
                "the client asked for TLS; this port speaks plain MySQL to local clients (use --ssl-mode=DISABLED or --skip-ssl)".into(),
            ));
        };
        // The client starts TLS right after its SSLRequest: what followed it is TLS.
        crate::listener::upgrade(client, acceptor, buf.split()).await?;
        *secure = true;
        (seq, payload) = next_packet(client, buf).await?;
    }
    parse_response(seq, &payload, offered)
}

/// Is this packet an SSLRequest (a HandshakeResponse cut after its fixed part, CLIENT_SSL set)?
pub fn is_ssl_request(payload: &[u8]) -> bool {
    payload.len() == 32 && payload[1] & 0x08 != 0
}

/// Parse a HandshakeResponse. Pure, so it can be fuzzed (tests/fuzz).
pub fn parse_response(
    seq: u8,
    payload: &[u8],
    offered: CapabilityFlags,
) -> Result<ClientHello, Failure> {
    if payload.len() < 32 {
        return Err(Failure::ClientProtocol(
            "HandshakeResponse too short".into(),
        ));
    }
    let response: HandshakeResponse<'_> = ParseBuf(payload)
        .parse(())
        .map_err(|e| Failure::ClientProtocol(format!("unreadable HandshakeResponse: {e}")))?;
    let caps = response.capabilities();
    if !caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
        return Err(Failure::ClientProtocol(
            "the client speaks a MySQL protocol older than 4.1".into(),
        ));
    }
    let user = String::from_utf8(response.user().to_vec())
        .map_err(|_| Failure::ClientProtocol("the user name is not UTF-8".into()))?;
    Ok(ClientHello {
        seq,
        user,
        login: ClientLogin {
            capabilities: caps & offered,
            mariadb_capabilities: response.mariadb_ext_capabilities() & MARIADB_CARRIED,
            collation: response.collation(),
            // HandshakeResponse has no getter for it; it sits right after the flags.
            max_packet_size: u32::from_le_bytes(payload[4..8].try_into().expect("parsed above")),
            database: response
                .db_name()
                .filter(|d| !d.is_empty())
                .map(<[u8]>::to_vec),
            attributes: response.connect_attributes(),
        },
        plugin: response
            .auth_plugin()
            .map(|p| p.as_bytes().to_vec())
            .unwrap_or_default(),
        auth: response.scramble_buf().to_vec(),
    })
}

/// Check the client's answer to our nonce against the target's secret. A client that
/// answered with another plugin, or with nothing yet (as libmariadb does for
/// caching_sha2_password when the greeting named another plugin), is asked again with an
/// AuthSwitchRequest. `seq` is the sequence id of our next packet, kept up to date.
pub async fn authenticate(
    client: &mut ClientIo,
    buf: &mut BytesMut,
    seq: &mut u8,
    secret: &crate::client_auth::ClientSecret,
    nonce: &[u8; 20],
    hello: &ClientHello,
) -> Result<(), Failure> {
    use super::wire::packet;
    use tokio::io::AsyncWriteExt;
    const NATIVE: &[u8] = b"mysql_native_password";
    const SHA2: &[u8] = b"caching_sha2_password";
    let io = |e: std::io::Error| Failure::ClientProtocol(e.to_string());
    let known = hello.plugin == NATIVE || hello.plugin == SHA2;
    let (plugin, answer) = if known && !hello.auth.is_empty() {
        (hello.plugin.clone(), hello.auth.clone())
    } else {
        let plugin = if hello.plugin == SHA2 { SHA2 } else { NATIVE };
        let mut switch = vec![0xfe];
        switch.extend_from_slice(plugin);
        switch.push(0);
        switch.extend_from_slice(nonce);
        switch.push(0);
        client.write_all(&packet(*seq, &switch)).await.map_err(io)?;
        let (got, answer) = next_packet(client, buf).await?;
        *seq = got.wrapping_add(1);
        (plugin.to_vec(), answer.to_vec())
    };
    if !secret.check_mysql(&plugin, nonce, &answer) {
        return Err(Failure::ClientAuth {
            user: hello.user.clone(),
        });
    }
    if plugin == SHA2 {
        // fast_auth_success: the OK follows.
        client
            .write_all(&packet(*seq, &[0x01, 0x03]))
            .await
            .map_err(io)?;
        *seq = seq.wrapping_add(1);
    }
    Ok(())
}
