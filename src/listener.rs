//! Where clients come in: TCP or a unix socket, behind one accept. Client streams are boxed
//! so the engines handle both (and, later, TLS) with one code path.

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::config::ListenAddr;

pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// A client connection, whatever carries it.
pub type ClientIo = Box<dyn ClientStream>;

pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when the listener goes.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr, mode: u32) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(path) => {
                clear_stale_socket(path).await?;
                let l = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The next client and a printable address for logs.
    pub async fn accept(&self) -> io::Result<(ClientIo, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                crate::upstream::tune(&s);
                Ok((Box::new(s), peer.to_string()))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), format!("unix:{}", path.display())))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A socket file left by a process that is gone is removed; one that answers is in use.
async fn clear_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        ));
    }
    std::fs::remove_file(path)
}

/// Turn a plain client stream into a TLS one (the engine has answered the client's
/// request for TLS). `early` holds bytes already read that belong to the TLS handshake
/// (MySQL clients start it right after their SSLRequest, with no answer to wait for).
pub async fn upgrade(
    client: &mut ClientIo,
    acceptor: &tokio_rustls::TlsAcceptor,
    early: bytes::BytesMut,
) -> Result<(), crate::failure::Failure> {
    let placeholder: ClientIo = Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()));
    let plain = std::mem::replace(client, placeholder);
    let plain: ClientIo = if early.is_empty() {
        plain
    } else {
        Box::new(Prefixed {
            early,
            inner: plain,
        })
    };
    let tls = acceptor.accept(plain).await.map_err(|e| {
        crate::failure::Failure::ClientProtocol(format!(
            "TLS handshake with the client failed: {e}"
        ))
    })?;
    *client = Box::new(tls);
    Ok(())
}

/// A stream that first yields bytes already read from it.
struct Prefixed {
    early: bytes::BytesMut,
    inner: ClientIo,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
