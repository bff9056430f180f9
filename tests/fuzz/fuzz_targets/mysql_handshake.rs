//! The MySQL handshake parsers: the client's HandshakeResponse (and SSLRequest) and the
//! server's greeting, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mysql_common::constants::CapabilityFlags;
use rds_iam_proxy::mysql::backend::parse_greeting;
use rds_iam_proxy::mysql::frontend::{is_ssl_request, parse_response};

fuzz_target!(|data: &[u8]| {
    let _ = is_ssl_request(data);
    if let Ok(hello) = parse_response(1, data, CapabilityFlags::all()) {
        assert!(hello.login.capabilities.contains(CapabilityFlags::CLIENT_PROTOCOL_41));
    }
    let _ = parse_greeting(data, "fuzz:3306");
});
