//! rds-iam-proxy: lets plain PostgreSQL and MySQL clients reach AWS RDS with IAM
//! authentication. See README.md for use; each module opens with what it is for.

pub mod admin;
pub mod aws;
pub mod check;
pub mod client_auth;
pub mod config;
pub mod failure;
pub mod listener;
pub mod metrics;
pub mod mysql;
pub mod postgres;
pub mod proxy;
pub mod relay;
pub mod service;
pub mod session;
pub mod systemd;
pub mod tls;
pub mod upstream;
pub mod util;
