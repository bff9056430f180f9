//! Command line: `run` (the default), `token`, `check`. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rds_iam_proxy::config::Config;

/// Let any PostgreSQL or MySQL client reach an AWS RDS / Aurora database with IAM
/// authentication.
///
/// Point psql, mysql, Bytebase or an application at the `listen` address of a target with a
/// plain connection and the target's db_user (no password). The proxy obtains AWS
/// credentials, assumes the configured roles, mints the RDS IAM token, opens a verified TLS
/// session to RDS and logs in with the token.
///
/// Start with `rds-iam-proxy --config FILE check --connect` to see every target log in; then
/// run it as a service (deploy/systemd/). Health and Prometheus metrics are served on
/// [admin] listen (default 127.0.0.1:9090): /metrics /startup /liveness /readiness.
/// SIGHUP reloads the config; SIGTERM drains open sessions ([proxy] shutdown_grace).
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
    /// Validate the config, obtain credentials through the role chain and mint each token;
    /// print one PASS/FAIL row per target (cause and fix) and exit non-zero on any failure.
    Check {
        /// Also open TLS to each database and log in with the token.
        #[arg(long)]
        connect: bool,
    },
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
    // One worker: tokio's current-thread scheduler, which skips the work-stealing
    // machinery a single worker cannot use (fewer instructions per relayed round trip).
    let mut builder = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.worker_threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rds-iam-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => rds_iam_proxy::service::run(cli.config, config).await,
            Command::Token { target } => rds_iam_proxy::check::token(config, &target).await,
            Command::Check { connect } => rds_iam_proxy::check::check(config, connect).await,
        }
    });
    // Whatever is still running (sessions past the grace period) ends with the process.
    runtime.shutdown_background();
    code
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
