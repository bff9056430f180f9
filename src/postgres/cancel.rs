//! CancelRequest routing. Each client gets a key of ours; a CancelRequest carrying it is sent
//! over TLS to the upstream that owns the session, with the server's own key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::TargetRuntime;

struct Route {
    target: Arc<TargetRuntime>,
    /// The very server of the session: a DNS name may lead elsewhere by now.
    addr: std::net::SocketAddr,
    pid: i32,
    secret: Bytes,
}

#[derive(Default)]
pub struct CancelRegistry {
    routes: Mutex<HashMap<(i32, Bytes), Route>>,
}

/// Removes the route when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    key: (i32, Bytes),
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.routes.lock().unwrap().remove(&self.key);
    }
}

impl CancelRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Register the server key; returns the guard and the (pid, secret) to give the client.
    pub fn register(
        self: &Arc<Self>,
        target: Arc<TargetRuntime>,
        addr: std::net::SocketAddr,
        pid: i32,
        secret: Bytes,
    ) -> (Registration, i32, i32) {
        let mut routes = self.routes.lock().unwrap();
        loop {
            let client_pid: i32 = rand::random::<i32>() & 0x7fff_ffff;
            let client_secret: i32 = rand::random();
            let key = (
                client_pid,
                Bytes::copy_from_slice(&client_secret.to_be_bytes()),
            );
            if routes.contains_key(&key) {
                continue;
            }
            routes.insert(
                key.clone(),
                Route {
                    target,
                    addr,
                    pid,
                    secret,
                },
            );
            return (
                Registration {
                    registry: self.clone(),
                    key,
                },
                client_pid,
                client_secret,
            );
        }
    }

    /// Send the cancel to the owning upstream. Unknown keys are ignored, as PostgreSQL does.
    pub async fn forward(&self, pid: i32, secret: &Bytes) {
        let route = {
            let routes = self.routes.lock().unwrap();
            routes
                .get(&(pid, secret.clone()))
                .map(|r| (r.target.clone(), r.addr, r.pid, r.secret.clone()))
        };
        let Some((target, addr, server_pid, server_secret)) = route else {
            tracing::info!("cancel request with an unknown key ignored");
            return;
        };
        match super::backend::open_tls(&target, Some(addr)).await {
            Ok(mut s) => {
                let mut m = BytesMut::with_capacity(16 + server_secret.len());
                m.put_i32((12 + server_secret.len()) as i32);
                m.put_i32(80877102);
                m.put_i32(server_pid);
                m.put_slice(&server_secret);
                if s.write_all(&m).await.is_ok() && s.flush().await.is_ok() {
                    // The server closes once it has read the request.
                    let mut sink = [0u8; 64];
                    let _ =
                        tokio::time::timeout(target.cfg.connect_timeout, s.read(&mut sink)).await;
                    tracing::info!(target = %target.cfg.name, "cancel request forwarded");
                }
            }
            Err(f) => {
                tracing::warn!(target = %target.cfg.name, error = %f, "cannot forward cancel request")
            }
        }
    }
}
