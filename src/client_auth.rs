//! Optional checks on local clients: a shared secret (read from a file or an environment
//! variable, never written in the config) and TLS toward clients. PostgreSQL clients prove
//! the secret with SCRAM-SHA-256; MySQL clients with mysql_native_password or
//! caching_sha2_password, which the config only allows over TLS.

use std::sync::Arc;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use zeroize::Zeroizing;

/// Iterations PostgreSQL uses for its own SCRAM secrets.
const SCRAM_ITERATIONS: u32 = 4096;

pub struct ClientSecret {
    password: Zeroizing<Vec<u8>>,
    salt: [u8; 16],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(<redacted>)")
    }
}

impl ClientSecret {
    pub fn new(password: &[u8]) -> Arc<ClientSecret> {
        let salt: [u8; 16] = rand::random();
        let mut salted = Zeroizing::new([0u8; 32]);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(SCRAM_ITERATIONS).expect("non-zero"),
            &salt,
            password,
            &mut salted[..],
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted[..]);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let server = hmac::sign(&key, b"Server Key");
        Arc::new(ClientSecret {
            password: Zeroizing::new(password.to_vec()),
            salt,
            stored_key: stored.as_ref().try_into().expect("32 bytes"),
            server_key: server.as_ref().try_into().expect("32 bytes"),
        })
    }

    /// The secret from a file (trailing newline ignored) or an environment variable.
    pub fn load(
        file: Option<&std::path::Path>,
        env: Option<&str>,
    ) -> Result<Arc<ClientSecret>, String> {
        let raw = match (file, env) {
            (Some(f), _) => std::fs::read(f).map_err(|e| {
                format!(
                    "`client_password_file` = \"{}\" cannot be read: {e}",
                    f.display()
                )
            })?,
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("`client_password_env` = \"{var}\": the variable is not set"))?
                .into_bytes(),
            (None, None) => return Err("no client password source".into()),
        };
        let raw = Zeroizing::new(raw);
        let trimmed = raw.strip_suffix(b"\n").unwrap_or(&raw);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        if trimmed.is_empty() {
            return Err("the client password is empty".into());
        }
        Ok(ClientSecret::new(trimmed))
    }

    /// MySQL: does `response` answer `nonce` with our password, for this plugin?
    pub fn check_mysql(&self, plugin: &[u8], nonce: &[u8; 20], response: &[u8]) -> bool {
        use mysql_common::auth::plugins::{caching_sha2_password, mysql_native_password};
        let expected: Option<Vec<u8>> = match plugin {
            b"mysql_native_password" => {
                mysql_native_password::scramble_native(nonce, &self.password).map(|s| s.to_vec())
            }
            b"caching_sha2_password" => {
                caching_sha2_password::scramble_sha256(nonce, &self.password).map(|s| s.to_vec())
            }
            _ => None,
        };
        expected.is_some_and(|e| constant_eq(&e, response))
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A SCRAM-SHA-256 exchange (RFC 5802/7677) as the server, without channel binding.
pub struct Scram {
    secret: Arc<ClientSecret>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl Scram {
    /// Read the client-first-message; the server-first-message to send back.
    pub fn start(
        secret: Arc<ClientSecret>,
        client_first: &[u8],
    ) -> Result<(Scram, String), String> {
        let text = std::str::from_utf8(client_first).map_err(|_| "SCRAM message is not UTF-8")?;
        // gs2 header: "n,," (no binding) or "y,," (client could bind, server did not offer).
        let bare = text
            .strip_prefix("n,,")
            .or_else(|| text.strip_prefix("y,,"))
            .ok_or("SCRAM: channel binding is not offered here")?;
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or("SCRAM: no client nonce")?;
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={SCRAM_ITERATIONS}",
            B64.encode(secret.salt)
        );
        Ok((
            Scram {
                secret,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Check the client-final-message; the server-final-message when the proof holds.
    pub fn finish(self, client_final: &[u8]) -> Result<String, String> {
        let text = std::str::from_utf8(client_final).map_err(|_| "SCRAM message is not UTF-8")?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or("SCRAM: no proof")?;
        let nonce = without_proof
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or("SCRAM: no nonce")?;
        if nonce != self.nonce {
            return Err("SCRAM: nonce mismatch".into());
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| "SCRAM: proof is not base64")?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let stored = hmac::Key::new(hmac::HMAC_SHA256, &self.secret.stored_key);
        let signature = hmac::sign(&stored, auth_message.as_bytes());
        if proof.len() != 32 {
            return Err("wrong password".into());
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(signature.as_ref())
            .map(|(p, s)| p ^ s)
            .collect();
        let candidate = digest::digest(&digest::SHA256, &client_key);
        if !constant_eq(candidate.as_ref(), &self.secret.stored_key) {
            return Err("wrong password".into());
        }
        let server = hmac::Key::new(hmac::HMAC_SHA256, &self.secret.server_key);
        let server_signature = hmac::sign(&server, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client computing its proof the RFC way.
    fn client_final(password: &[u8], server_first: &str, client_first_bare: &str) -> String {
        let mut parts = server_first.split(',');
        let nonce = parts.next().unwrap().strip_prefix("r=").unwrap();
        let salt = B64
            .decode(parts.next().unwrap().strip_prefix("s=").unwrap())
            .unwrap();
        let iters: u32 = parts
            .next()
            .unwrap()
            .strip_prefix("i=")
            .unwrap()
            .parse()
            .unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iters.try_into().unwrap(),
            &salt,
            password,
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            auth.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(sig.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    #[test]
    fn scram_accepts_the_password_and_refuses_another() {
        let secret = ClientSecret::new(b"s3cret pass");
        for (pw, ok) in [(&b"s3cret pass"[..], true), (&b"wrong"[..], false)] {
            let (scram, server_first) = Scram::start(secret.clone(), b"n,,n=,r=abcdefgh").unwrap();
            let fin = client_final(pw, &server_first, "n=,r=abcdefgh");
            assert_eq!(scram.finish(fin.as_bytes()).is_ok(), ok);
        }
    }

    #[test]
    fn mysql_scrambles_are_checked_per_plugin() {
        use mysql_common::auth::plugins::mysql_native_password::scramble_native;
        let secret = ClientSecret::new(b"pw");
        let nonce = [7u8; 20];
        let good = scramble_native(&nonce, b"pw").unwrap();
        assert!(secret.check_mysql(b"mysql_native_password", &nonce, &good));
        assert!(!secret.check_mysql(
            b"mysql_native_password",
            &nonce,
            &scramble_native(&nonce, b"px").unwrap()
        ));
        assert!(!secret.check_mysql(b"mysql_clear_password", &nonce, b"pw\0"));
        assert!(!format!("{:?}", secret).contains("pw"));
    }
}
