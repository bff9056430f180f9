//! Small helpers shared across modules.

use std::time::SystemTime;

/// RFC 3339 UTC timestamp, for logs.
pub fn rfc3339(t: SystemTime) -> String {
    let t: time::OffsetDateTime = t.into();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".into())
}
