//! rds-iam-proxy: lets plain PostgreSQL (and soon MySQL) clients reach AWS RDS with IAM
//! authentication. See README.md for use and ../DESIGN notes for the architecture.

pub mod aws;
pub mod config;
pub mod failure;
pub mod mysql;
pub mod postgres;
pub mod proxy;
pub mod relay;
pub mod tls;
pub mod upstream;
pub mod util;
