//! Reaching the upstream: the configured addresses in order, or the connection's original
//! destination (iptables REDIRECT), over TLS (OpenSSL, optional pin) or plain TCP.

use super::Io;
use super::health::{Check, Health};
use crate::config::{Config, UpstreamMode};
use crate::metrics::Metrics;
use crate::route::Path;
use crate::tls::{TlsError, UpstreamConnector};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A connected upstream.
pub struct Upstream {
    /// The stream.
    pub io: Box<dyn Io>,
    /// Our address on this leg.
    pub local: SocketAddr,
    /// The upstream's address.
    pub remote: SocketAddr,
    /// The address as configured (`host:port`), the key of its health.
    pub target: String,
}

/// Why no upstream could be reached (the last attempt's error).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Transparent mode, but the connection has no original destination.
    #[error("no original destination (is the iptables REDIRECT rule in place?)")]
    NoOriginalDst,
    /// No address is configured for this path.
    #[error("no address configured")]
    NoAddress,
    /// Name resolution or TCP connect failed.
    #[error("{addr}: connect: {source}")]
    Connect {
        /// Target.
        addr: String,
        /// Error.
        source: std::io::Error,
    },
    /// The attempt took longer than `timeouts.upstream_connect`.
    #[error("{addr}: timed out after {after:?}")]
    Timeout {
        /// Target.
        addr: String,
        /// Timeout.
        after: Duration,
    },
    /// TLS failed (including a pin mismatch).
    #[error("{addr}: {}", tls_detail(source))]
    Tls {
        /// Target.
        addr: String,
        /// Error.
        source: TlsError,
    },
}

/// A TLS failure, with a hint when the peer evidently does not speak TLS at all.
fn tls_detail(e: &TlsError) -> String {
    let text = e.to_string();
    let plain = [
        "wrong version number",
        "packet length too long",
        "http request",
        "record layer failure",
    ];
    if plain.iter().any(|p| text.contains(p)) {
        format!(
            "{text} (the upstream does not speak TLS here: a plaintext server? set tls = false \
             for a plaintext controller, or check the address)"
        )
    } else {
        text
    }
}

impl UpstreamError {
    /// What went wrong, without the address (for health records keyed by address).
    pub fn detail(&self) -> String {
        match self {
            Self::NoOriginalDst | Self::NoAddress => self.to_string(),
            Self::Connect { source, .. } => format!("connect: {source}"),
            Self::Timeout { after, .. } => format!("timed out after {after:?}"),
            Self::Tls { source, .. } => tls_detail(source),
        }
    }

    /// The proxy itself could not open the connection (out of descriptors or memory): says
    /// nothing about the upstream.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Connect { source, .. }
        if matches!(
            source.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        ))
    }

    /// Metrics label.
    pub fn label(&self) -> &'static str {
        if self.is_local() {
            return "local_error";
        }
        match self {
            Self::NoOriginalDst => "no_original_dst",
            Self::NoAddress => "no_address",
            Self::Connect { .. } => "connect_error",
            Self::Timeout { .. } => "timeout",
            Self::Tls {
                source: TlsError::PinMismatch { .. },
                ..
            } => "pin_mismatch",
            Self::Tls { .. } => "tls_error",
        }
    }
}

/// The original destination of a redirected connection, if it differs from where it landed.
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let orig = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (orig != local).then_some(orig)
}

/// The host part of `host:port` (`[v6]:port` keeps its brackets; the connector strips them).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// One TCP (+ TLS) connection to `addr` (no health bookkeeping).
pub async fn attempt(
    addr: &str,
    tls: Option<&UpstreamConnector>,
) -> Result<Upstream, UpstreamError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| UpstreamError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().map_err(|source| UpstreamError::Connect {
        addr: addr.to_owned(),
        source,
    })?;
    let remote = tcp.peer_addr().map_err(|source| UpstreamError::Connect {
        addr: addr.to_owned(),
        source,
    })?;
    let io: Box<dyn Io> =
        match tls {
            Some(c) => Box::new(c.connect(tcp, host_of(addr)).await.map_err(|source| {
                UpstreamError::Tls {
                    addr: addr.to_owned(),
                    source,
                }
            })?),
            None => Box::new(tcp),
        };
    Ok(Upstream {
        io,
        local,
        remote,
        target: addr.to_owned(),
    })
}

/// Where to connect: the addresses to try, in order, and how.
pub struct Target<'a> {
    /// `host:port` candidates.
    pub addresses: Vec<String>,
    /// TLS connector, or `None` for plain TCP.
    pub tls: Option<&'a UpstreamConnector>,
    /// Per-address limit.
    pub timeout: Duration,
}

impl<'a> Target<'a> {
    /// The legacy upstream of `cfg` (fixed addresses, or the original destination).
    pub fn legacy(
        cfg: &Config,
        connector: &'a UpstreamConnector,
        orig_dst: Option<SocketAddr>,
    ) -> Result<Self, UpstreamError> {
        let addresses = match cfg.upstream.mode {
            UpstreamMode::Transparent => {
                vec![orig_dst.ok_or(UpstreamError::NoOriginalDst)?.to_string()]
            }
            UpstreamMode::Fixed => cfg.upstream.addresses.clone(),
        };
        Ok(Self {
            addresses,
            tls: cfg.upstream.tls.then_some(connector),
            timeout: cfg.timeouts.upstream_connect,
        })
    }

    /// The new-path backend of `cfg`.
    pub fn new_path(cfg: &Config, connector: &'a UpstreamConnector) -> Self {
        Self {
            addresses: cfg.new_path.addresses.clone(),
            tls: cfg.new_path.tls.enabled().then_some(connector),
            timeout: cfg.timeouts.upstream_connect,
        }
    }
}

/// One TCP (+ TLS) connection to `addr`, closed at once: the health probe.
pub async fn probe(
    addr: &str,
    tls: Option<&UpstreamConnector>,
    timeout: Duration,
) -> Result<(), UpstreamError> {
    match tokio::time::timeout(timeout, attempt(addr, tls)).await {
        Ok(Ok(mut up)) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut up.io).await;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(UpstreamError::Timeout {
            addr: addr.to_owned(),
            after: timeout,
        }),
    }
}

/// Connects to the first address of `target` that answers, trying addresses that are backing
/// off after failures last; connect and TLS failures are recorded in `health`.
pub async fn connect(
    target: &Target<'_>,
    metrics: &Metrics,
    health: &Health,
    path: Path,
) -> Result<Upstream, UpstreamError> {
    let mut last = None;
    for addr in &health.order(path, &target.addresses) {
        let started = Instant::now();
        let r = match tokio::time::timeout(target.timeout, attempt(addr, target.tls)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                addr: addr.clone(),
                after: target.timeout,
            }),
        };
        match r {
            Ok(up) => {
                metrics.upstream_connect(path, "ok");
                metrics
                    .upstream_connect_seconds
                    .with_label_values(&[path.label()])
                    .observe(started.elapsed().as_secs_f64());
                return Ok(up);
            }
            Err(e) => {
                metrics.upstream_connect(path, e.label());
                if e.is_local() {
                    // Not the upstream's fault: no health record, no other address would do
                    // better. Say what to do about it.
                    tracing::error!(upstream = %addr, error = %e,
                        "the proxy is out of descriptors or memory: raise its limit (ulimit -n, systemd LimitNOFILE) or lower limits.max_connections");
                    return Err(e);
                }
                health.record(path, addr, Check::Failed(e.detail()));
                if let UpstreamError::Tls {
                    source: TlsError::PinMismatch { got },
                    ..
                } = &e
                {
                    let section = match path {
                        Path::Legacy => "upstream",
                        Path::New => "new_path",
                    };
                    tracing::warn!(
                        upstream = %addr,
                        "{section} certificate sha256 {got} matches no {section}.pin_sha256 entry: \
                         someone may be intercepting this connection. If the server's \
                         certificate was replaced on purpose (confirm it out of band), add \
                         \"{got}\" to {section}.pin_sha256"
                    );
                } else {
                    tracing::warn!(upstream = %addr, error = %e, "upstream connect failed");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(UpstreamError::NoAddress))
}
