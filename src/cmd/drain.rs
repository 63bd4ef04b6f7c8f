//! `cync-mitm drain`: begin a running proxy's drain (`POST /drain`) and wait for its sessions
//! to close (`GET /drain`).

use super::slo::{Answer, Error, admin_call};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often the drain's progress is read.
const POLL: Duration = Duration::from_millis(250);
/// How often progress is printed (stderr).
const TELL: Duration = Duration::from_secs(5);

fn sessions(v: &Value) -> u64 {
    v["sessions"].as_u64().unwrap_or(0)
}

/// Begins the drain at `rate` devices per second; with `wait`, polls until no session is left
/// or `timeout` passes. `Ok((true, _))`: drained (or begun, without `wait`); `Ok((false, _))`:
/// sessions still open at the timeout.
pub async fn run(
    addr: SocketAddr,
    rate: u32,
    timeout: Duration,
    wait: bool,
) -> Result<(bool, String), Error> {
    let start = Instant::now();
    let unreachable =
        |e: String| Error::Refused(format!("no proxy answered at http://{addr}: {e}"));
    let begun = match admin_call(addr, &format!("/drain?rate={rate}"), true).await? {
        Answer::Ok(v) => v,
        Answer::Unreachable(e) => return Err(unreachable(e)),
    };
    let what = if begun["result"] == "already_draining" {
        "already draining"
    } else {
        "draining"
    };
    let per_second = begun["per_second"].as_u64().unwrap_or(u64::from(rate));
    if !wait {
        return Ok((
            true,
            format!(
                "{what} at {per_second}/s: {} sessions open",
                sessions(&begun)
            ),
        ));
    }
    let mut last = begun;
    let mut told = Instant::now();
    loop {
        if sessions(&last) == 0 {
            return Ok((
                true,
                format!(
                    "drained: {} sessions asked to close, none left after {:.1} s",
                    last["asked_to_close"].as_u64().unwrap_or(0),
                    start.elapsed().as_secs_f64()
                ),
            ));
        }
        if start.elapsed() >= timeout {
            return Ok((
                false,
                format!(
                    "{} sessions still open after {} (the drain goes on)",
                    sessions(&last),
                    humantime::format_duration(timeout)
                ),
            ));
        }
        if told.elapsed() >= TELL {
            eprintln!("cync-mitm drain: {what}: {} sessions left", sessions(&last));
            told = Instant::now();
        }
        tokio::time::sleep(POLL.min(timeout.saturating_sub(start.elapsed()))).await;
        last = match admin_call(addr, "/drain", false).await? {
            Answer::Ok(v) => v,
            // The process ended while we waited: nothing is left open.
            Answer::Unreachable(_) => {
                return Ok((
                    true,
                    format!(
                        "drained: the proxy stopped answering after {:.1} s (it exited)",
                        start.elapsed().as_secs_f64()
                    ),
                ));
            }
        };
    }
}
