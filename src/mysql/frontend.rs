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

/// The greeting for the client and the capabilities it offers.
pub fn greeting(upstream: &HandshakePacket<'_>) -> (Vec<u8>, CapabilityFlags) {
    let offered = (upstream.capabilities() - NOT_CARRIED) | CapabilityFlags::CLIENT_PLUGIN_AUTH;
    let scramble: [u8; 20] = std::array::from_fn(|_| rand::random::<u8>() % 94 + 33);
    let mut part2 = scramble[8..].to_vec();
    part2.push(0);
    let packet = HandshakePacket::new(
        10,
        upstream.server_version_ref(),
        // The server's thread id, so KILL QUERY and CONNECTION_ID() mean the same thing.
        upstream.connection_id(),
        scramble[..8].try_into().expect("8 bytes"),
        Some(part2),
        offered,
        upstream.default_collation(),
        upstream.status_flags(),
        Some(&b"mysql_native_password"[..]),
    )
    .with_mariadb_ext_capabilities(upstream.mariadb_ext_capabilities() & MARIADB_CARRIED);
    let mut out = Vec::new();
    packet.serialize(&mut out);
    (out, offered)
}

pub struct ClientHello {
    pub seq: u8,
    pub user: String,
    pub login: ClientLogin,
}

/// Read the client's HandshakeResponse.
pub async fn read_response(
    client: &mut ClientIo,
    buf: &mut BytesMut,
    offered: CapabilityFlags,
) -> Result<ClientHello, Failure> {
    let (seq, payload) = match read_packet(client, buf, MAX_RESPONSE).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(Failure::ClientProtocol(
                "the client closed the connection during the handshake".into(),
            ))
        }
        Err(e) => return Err(Failure::ClientProtocol(e.to_string())),
    };
    if payload.len() == 32 && payload[1] & 0x08 != 0 {
        // An SSLRequest although TLS was not offered.
        return Err(Failure::ClientProtocol(
            "the client asked for TLS; this port speaks plain MySQL to local clients (use --ssl-mode=DISABLED or --skip-ssl)".into(),
        ));
    }
    let response: HandshakeResponse<'_> = ParseBuf(&payload)
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
    })
}
