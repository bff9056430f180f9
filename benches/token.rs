//! Token minting and the cache-hit path a new connection takes (criterion).
//! `cargo bench --bench token`

use std::sync::Arc;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use criterion::{criterion_group, criterion_main, Criterion};
use rds_iam_proxy::aws::cache::{CredentialSource, TokenCache, TokenKey};
use rds_iam_proxy::aws::token::generate;
use rds_iam_proxy::aws::CredentialsFailure;

struct Fixed(Credentials);
impl CredentialSource for Fixed {
    fn credentials(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Credentials, CredentialsFailure>> + Send + '_>,
    > {
        let c = self.0.clone();
        Box::pin(async move { Ok(c) })
    }
    fn identity(&self) -> String {
        "bench".into()
    }
}

fn creds() -> Credentials {
    Credentials::new(
        "ASIAEXAMPLEEXAMPLE01",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        Some("IQoJb3JpZ2luX2VjEJr".repeat(40)),
        None,
        "bench",
    )
}

fn tokens(c: &mut Criterion) {
    let creds = creds();
    c.bench_function("mint token (with session token)", |b| {
        b.iter(|| {
            generate(
                &creds,
                "orders.abc123.us-east-1.rds.amazonaws.com",
                5432,
                "bytebase",
                "us-east-1",
                SystemTime::now(),
            )
            .unwrap()
        })
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let entry = rt.block_on(async {
        let cache = TokenCache::new();
        let key = TokenKey {
            credentials: rds_iam_proxy::config::CredentialSpec {
                base: rds_iam_proxy::config::BaseCredentials::DefaultChain,
                hops: vec![],
                sts_region: "us-east-1".into(),
            },
            region: "us-east-1".into(),
            host: "orders.abc123.us-east-1.rds.amazonaws.com".into(),
            port: 5432,
            user: "bytebase".into(),
        };
        let entry = cache.entry(key, Arc::new(Fixed(creds.clone())));
        entry.token().await.unwrap();
        entry
    });
    c.bench_function("token cache hit (cached)", |b| {
        b.iter(|| entry.cached().unwrap())
    });
    c.bench_function("token cache hit (token().await)", |b| {
        b.iter(|| rt.block_on(entry.token()).unwrap())
    });
}

criterion_group!(benches, tokens);
criterion_main!(benches);
