//! `cync-mitm upstream fingerprint HOST:PORT`: connects once (TCP + TLS, accepting any
//! certificate, offering every suite and version down to TLS 1.0) and prints the certificate
//! chain the server presents, with the SHA-256 of the leaf's DER: the value `pin_sha256` takes.

use openssl::ssl::{SslConnector, SslMethod, SslOptions, SslVerifyMode, SslVersion};
use openssl::x509::{X509NameRef, X509Ref};
use serde::Serialize;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::TcpStream;

/// Why no chain was fetched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not `host:port`.
    #[error("{0:?} is not host:port")]
    Address(String),
    /// TCP connect failed.
    #[error("{addr}: connect: {source}")]
    Connect {
        /// Target.
        addr: String,
        /// Error.
        source: std::io::Error,
    },
    /// Nothing within the timeout.
    #[error("{addr}: no TLS handshake within {after:?}")]
    Timeout {
        /// Target.
        addr: String,
        /// Timeout.
        after: Duration,
    },
    /// The TLS handshake failed.
    #[error("{addr}: TLS handshake failed: {reason}")]
    Handshake {
        /// Target.
        addr: String,
        /// Reason.
        reason: String,
    },
    /// OpenSSL setup.
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// One certificate of the chain.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// SHA-256 of the DER, hex: the value to pin.
    pub sha256: String,
    /// Subject, `CN=…, O=…`.
    pub subject: String,
    /// Issuer.
    pub issuer: String,
    /// Subject alternative names (DNS names and IPs).
    pub names: Vec<String>,
    /// Validity start.
    pub not_before: String,
    /// Validity end.
    pub not_after: String,
}

/// What the server presented.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The address connected to.
    pub address: String,
    /// Negotiated protocol version.
    pub protocol: String,
    /// Negotiated cipher suite.
    pub cipher: String,
    /// The chain, leaf first.
    pub chain: Vec<CertInfo>,
}

fn name_text(n: &X509NameRef) -> String {
    n.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let val = e.data().to_string().unwrap_or_else(|_| "?".into());
            format!("{key}={val}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn info(c: &X509Ref) -> Result<CertInfo, openssl::error::ErrorStack> {
    let names = c
        .subject_alt_names()
        .map(|sans| {
            sans.iter()
                .filter_map(|n| {
                    n.dnsname().map(str::to_owned).or_else(|| {
                        n.ipaddress().and_then(|b| match b.len() {
                            4 => <[u8; 4]>::try_from(b)
                                .ok()
                                .map(|a| std::net::IpAddr::from(a).to_string()),
                            16 => <[u8; 16]>::try_from(b)
                                .ok()
                                .map(|a| std::net::IpAddr::from(a).to_string()),
                            _ => None,
                        })
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo {
        sha256: crate::tls::cert_sha256_hex(&c.to_der()?),
        subject: name_text(c.subject_name()),
        issuer: name_text(c.issuer_name()),
        names,
        not_before: c.not_before().to_string(),
        not_after: c.not_after().to_string(),
    })
}

/// Connects to `addr` and reports the chain. `sni` is sent when given (as the proxy would
/// with `upstream.sni`).
pub async fn fingerprint(
    addr: &str,
    sni: Option<&str>,
    timeout: Duration,
) -> Result<Report, Error> {
    if !crate::config::check_host_port(addr) {
        return Err(Error::Address(addr.to_owned()));
    }
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    b.set_verify(SslVerifyMode::NONE);
    b.set_cipher_list("ALL:@SECLEVEL=0")?;
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    b.set_min_proto_version(Some(SslVersion::TLS1))?;
    let connector = b.build();
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let ssl = connector
            .configure()?
            .use_server_name_indication(sni.is_some())
            .verify_hostname(false)
            .into_ssl(sni.unwrap_or("cync-mitm.invalid"))?;
        let mut s = tokio_openssl::SslStream::new(ssl, tcp)?;
        Pin::new(&mut s)
            .connect()
            .await
            .map_err(|e| Error::Handshake {
                addr: addr.to_owned(),
                reason: crate::tls::describe_ssl_error(&e),
            })?;
        let ssl = s.ssl();
        let mut chain = Vec::new();
        match ssl.peer_cert_chain() {
            Some(stack) if !stack.is_empty() => {
                for c in stack {
                    chain.push(info(c)?);
                }
            }
            _ => {
                if let Some(c) = ssl.peer_certificate() {
                    chain.push(info(&c)?);
                }
            }
        }
        Ok(Report {
            address: addr.to_owned(),
            protocol: ssl.version_str().to_owned(),
            cipher: ssl
                .current_cipher()
                .map_or_else(|| "?".to_owned(), |c| c.name().to_owned()),
            chain,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| Error::Timeout {
            addr: addr.to_owned(),
            after: timeout,
        })?
}

/// The report as text, ending with the lines to paste into the config file.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{}: {} {}", r.address, r.protocol, r.cipher);
    for (i, c) in r.chain.iter().enumerate() {
        let role = if i == 0 {
            " (leaf: the one to pin)"
        } else {
            ""
        };
        let _ = writeln!(out, "certificate {i}{role}");
        let _ = writeln!(out, "  sha256   {}", c.sha256);
        let _ = writeln!(out, "  subject  {}", c.subject);
        let _ = writeln!(out, "  issuer   {}", c.issuer);
        if !c.names.is_empty() {
            let _ = writeln!(out, "  names    {}", c.names.join(", "));
        }
        let _ = writeln!(out, "  valid    {} to {}", c.not_before, c.not_after);
    }
    match r.chain.first() {
        Some(leaf) => {
            let _ = writeln!(
                out,
                "\nTo accept only this certificate, put in the config file's [upstream] (or \
                 [new_path]) section:\n  pin_sha256 = [\"{}\"]",
                leaf.sha256
            );
        }
        None => {
            let _ = writeln!(
                out,
                "\nThe server presented no certificate: nothing to pin."
            );
        }
    }
    out
}
