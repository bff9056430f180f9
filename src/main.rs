//! Command line: `run` (the default), `token`, `check`. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rds_iam_proxy::config::Config;
use rds_iam_proxy::proxy::Proxy;

/// Let any PostgreSQL client reach an AWS RDS / Aurora database with IAM authentication.
///
/// Point psql, Bytebase or an application at the `listen` address of a target with a plain
/// connection and the target's db_user (no password). The proxy obtains AWS credentials,
/// assumes the configured roles, mints the RDS IAM token, opens a verified TLS session to
/// RDS and logs in with the token.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Configuration file (TOML, see config/example.toml).
    #[arg(
        long,
        short = 'c',
        env = "RDS_IAM_PROXY_CONFIG",
        default_value = "/etc/rds-iam-proxy/config.toml",
        global = true
    )]
    config: PathBuf,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_LOG_LEVEL",
        default_value = "info",
        global = true
    )]
    log_level: String,
    /// Log format.
    #[arg(long, env = "RDS_IAM_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every target of the config (the default).
    Run,
    /// Print the current IAM token of a target, for scripts and password commands.
    Token {
        /// The target's name.
        #[arg(long)]
        target: String,
    },
    /// Validate the config, obtain credentials through the role chain and mint each token.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rds-iam-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run(config).await,
            Command::Token { target } => token(config, &target).await,
            Command::Check => check(config).await,
        }
    })
}

const SECRET_TRACING_CRATES: &[&str] = &[
    "aws_sigv4",
    "aws_config",
    "aws_sdk_sts",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_types",
    "aws_credential_types",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
];

fn init_logging(cli: &Cli) {
    use tracing_subscriber::filter::{filter_fn, EnvFilter};
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // At trace level the AWS SDK prints canonical requests (with the session token) and
    // response bodies (with secret keys). A per-layer filter drops those events whatever
    // RUST_LOG says; a directive could be out-ranked by a more specific one.
    let no_sdk_trace = filter_fn(|meta| {
        *meta.level() != tracing::Level::TRACE
            || !SECRET_TRACING_CRATES
                .iter()
                .any(|c| meta.target() == *c || meta.target().starts_with(&format!("{c}::")))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = match cli.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt.with_filter(no_sdk_trace))
        .init();
}

async fn run(config: Config) -> ExitCode {
    let proxy = match Proxy::build(&config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let listeners = match proxy.bind().await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    proxy.warm_up();
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Without a handler SIGHUP would kill the process and every session with it.
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            while hup.recv().await.is_some() {
                tracing::warn!("SIGHUP: configuration reload is not supported yet; restart the service to apply a new config");
            }
        }
    });
    tokio::select! {
        _ = proxy.serve(listeners) => {}
        _ = shutdown_signal() => tracing::info!("stopping"),
    }
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn token(config: Config, name: &str) -> ExitCode {
    if config.target(name).is_none() {
        let names: Vec<_> = config.targets.iter().map(|t| t.name.as_str()).collect();
        eprintln!(
            "rds-iam-proxy: no target named \"{name}\"; the config has: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    }
    let proxy = match Proxy::build(&config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let t = proxy
        .targets
        .iter()
        .find(|t| t.cfg.name == name)
        .expect("checked above");
    match t.tokens.token().await {
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

async fn check(config: Config) -> ExitCode {
    let proxy = match Proxy::build(&config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rds-iam-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failed = false;
    for t in &proxy.targets {
        match t.tokens.token().await {
            Ok(tok) => println!(
                "PASS  {}  token for {}@{}:{} valid until {}",
                t.cfg.name,
                t.cfg.db_user,
                t.cfg.host,
                t.cfg.port,
                rds_iam_proxy::util::rfc3339(tok.expires_at)
            ),
            Err(e) => {
                failed = true;
                println!("FAIL  {}  {e}", t.cfg.name);
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
