//! Token figures (printed, not asserted): signing a token, and a cache hit.
//! `cargo bench --bench token`

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use aws_credential_types::Credentials;
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

fn per_op(label: &str, n: u32, f: impl Fn()) {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{label:<28} {:>10.0} ns/op", ns);
}

fn main() {
    let creds = Credentials::new(
        "ASIAEXAMPLEEXAMPLE01",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        Some("IQoJb3JpZ2luX2VjEJr".repeat(40)),
        None,
        "bench",
    );
    per_op("sign token (session token)", 20_000, || {
        let t = generate(
            &creds,
            "orders.abc123.us-east-1.rds.amazonaws.com",
            5432,
            "bytebase",
            "us-east-1",
            SystemTime::now(),
        )
        .unwrap();
        std::hint::black_box(t);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
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
        per_op("token cache hit", 2_000_000, || {
            std::hint::black_box(entry.cached().unwrap());
        });
    });
}
