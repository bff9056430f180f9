//! The `check` and `token` commands: what an operator runs before (or instead of) starting
//! the service, one row per target with the cause and the fix of any failure.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use mysql_common::constants::{CapabilityFlags, MariadbCapabilities};
use tokio::io::AsyncWriteExt;

use crate::config::{Config, Engine};
use crate::failure::Failure;
use crate::proxy::{within, Proxy, TargetRuntime};

/// Credentials through the whole chain and a token per target; with `connect`, also the
/// full upstream TLS and token login. Non-zero exit on any failure.
pub async fn check(config: Config, connect: bool) -> ExitCode {
    let proxy = Proxy::new();
    let targets = match proxy.runtimes(&config).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failed = false;
    for t in &targets {
        let row = match one(t, connect).await {
            Ok(what) => format!("PASS  {:<16} {what}", t.cfg.name),
            Err(f) => {
                failed = true;
                format!("FAIL  {:<16} {f}\n      fix: {}", t.cfg.name, f.fix())
            }
        };
        println!("{row}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn one(t: &Arc<TargetRuntime>, connect: bool) -> Result<String, Failure> {
    let token = t
        .tokens
        .token()
        .await
        .map_err(|e| Failure::Credentials(e.to_string()))?;
    let mut what = format!(
        "{} token for {}@{}:{} (region {}) valid until {}",
        t.cfg.engine.as_str(),
        t.cfg.db_user,
        t.cfg.host,
        t.cfg.port,
        t.cfg.region,
        crate::util::rfc3339(token.expires_at)
    );
    if connect {
        within(
            t.login_timeout(),
            "the database login did not finish",
            login(t),
        )
        .await?;
        what.push_str(&format!("; TLS and IAM login to {} ok", t.cfg.dial));
    }
    Ok(what)
}

/// A real login as `db_user`, closed politely right after.
async fn login(t: &Arc<TargetRuntime>) -> Result<(), Failure> {
    match t.cfg.engine {
        Engine::Postgres => {
            let mut startup = pgwire::messages::startup::Startup::new();
            startup
                .parameters
                .insert("user".into(), t.cfg.db_user.clone());
            startup
                .parameters
                .insert("application_name".into(), "rds-iam-proxy check".into());
            let db = t.cfg.database.clone().unwrap_or_else(|| "postgres".into());
            let mut up = crate::postgres::backend::connect(t, &startup, &db).await?;
            // Terminate.
            let _ = up.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
            let _ = up.stream.shutdown().await;
        }
        Engine::Mysql => {
            let (tcp, greeting) = crate::mysql::backend::greet(t).await?;
            let login = crate::mysql::backend::ClientLogin {
                capabilities: CapabilityFlags::CLIENT_PROTOCOL_41
                    | CapabilityFlags::CLIENT_SECURE_CONNECTION
                    | CapabilityFlags::CLIENT_PLUGIN_AUTH
                    | CapabilityFlags::CLIENT_CONNECT_ATTRS
                    | CapabilityFlags::CLIENT_TRANSACTIONS,
                mariadb_capabilities: MariadbCapabilities::empty(),
                collation: 45, // utf8mb4_general_ci
                max_packet_size: 16 << 20,
                database: t.cfg.database.as_ref().map(|d| d.as_bytes().to_vec()),
                attributes: Some(HashMap::from([(
                    "program_name".to_string(),
                    "rds-iam-proxy check".to_string(),
                )])),
            };
            let mut up = crate::mysql::backend::login(t, tcp, &greeting, &login).await?;
            // COM_QUIT.
            let _ = up
                .stream
                .write_all(&crate::mysql::wire::packet(0, &[0x01]))
                .await;
            let _ = up.stream.shutdown().await;
        }
    }
    Ok(())
}

/// Print the current token of one target.
pub async fn token(config: Config, name: &str) -> ExitCode {
    let Some(target) = config.target(name).cloned() else {
        let names: Vec<_> = config.targets.iter().map(|t| t.name.as_str()).collect();
        eprintln!(
            "rds-iam-proxy: no target named \"{name}\"; the config has: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    let only = Config {
        targets: vec![target],
        ..config
    };
    let proxy = Proxy::new();
    let targets = match proxy.runtimes(&only).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    match targets[0].tokens.token().await {
        Ok(tok) => {
            println!("{}", tok.value());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rds-iam-proxy: target \"{name}\": {e}");
            ExitCode::FAILURE
        }
    }
}
