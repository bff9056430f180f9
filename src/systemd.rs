//! sd_notify without libsystemd: datagrams to `$NOTIFY_SOCKET` (READY=1, STATUS=...,
//! STOPPING=1, WATCHDOG=1). A no-op when not started by systemd with Type=notify.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Send one notification; false when there is no socket or sending failed.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // Abstract namespace socket.
        use std::os::linux::net::SocketAddrExt;
        match std::os::unix::net::SocketAddr::from_abstract_name(name) {
            Ok(addr) => sock.send_to_addr(state.as_bytes(), &addr),
            Err(e) => Err(e),
        }
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    sent.is_ok()
}

/// When `WatchdogSec` is set (WATCHDOG_USEC, for this process), ping at half the interval.
pub fn spawn_watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&u| u > 0)
    else {
        return;
    };
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return;
        }
    }
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        loop {
            // The runtime answering is what the watchdog vouches for.
            notify("WATCHDOG=1");
            tokio::time::sleep(every).await;
        }
    });
}
