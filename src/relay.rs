//! The byte pump after authentication, shared by both engines.

use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes moved by a finished relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Relayed {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Copy both ways until either side closes; the other side is then shut down.
pub async fn relay<C, S>(client: &mut C, server: &mut S) -> (Relayed, Option<std::io::Error>)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional(client, server).await {
        Ok((up, down)) => (
            Relayed {
                client_to_server: up,
                server_to_client: down,
            },
            None,
        ),
        Err(e) => (Relayed::default(), Some(e)),
    }
}
