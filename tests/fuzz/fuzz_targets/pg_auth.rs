//! The client's side of PostgreSQL authentication: SASLInitialResponse parsing, the SCRAM
//! exchange, and the message-boundary tracker, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rds_iam_proxy::client_auth::{ClientSecret, Scram};
use rds_iam_proxy::postgres::frontend::parse_sasl_initial;
use rds_iam_proxy::postgres::wire::Boundaries;
use rds_iam_proxy::relay::{Inspect, Verdict};

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static SECRET: std::sync::Arc<ClientSecret> = ClientSecret::new(b"fuzz-password");
    }
    let (first, last) = data.split_at(data.len() / 2);
    if let Ok(client_first) = parse_sasl_initial(first) {
        if let Ok((scram, _server_first)) = Scram::start(SECRET.with(|s| s.clone()), client_first) {
            let _ = scram.finish(last);
        }
    }
    let mut b = Boundaries::default();
    for chunk in data.chunks(5) {
        assert_eq!(b.inspect(chunk), Verdict::Pass(chunk.len()));
    }
});
