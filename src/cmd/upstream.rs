//! `cync-mitm upstream fingerprint HOST:PORT`: connects (TCP + TLS, accepting any
//! certificate, offering every suite and version down to TLS 1.0) and prints the certificate
//! chain the server presents, with the SHA-256 of the leaf's DER: the value `pin_sha256` takes.
//! A server may hold several leaves (RSA and ECDSA, as cync-mitm itself does) and pick one by
//! the suites offered, so it also connects once per key type and TLS version and lists every
//! distinct leaf: pin them all, whatever the proxy's cipher list makes the server choose.

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

/// One leaf certificate and the handshakes that got it.
#[derive(Debug, Clone, Serialize)]
pub struct Leaf {
    /// SHA-256 of the DER: a `pin_sha256` value.
    pub sha256: String,
    /// Subject.
    pub subject: String,
    /// Handshakes that were served it (`"TLS 1.2 RSA"`, `"TLS 1.3"`, ...).
    pub served_to: Vec<String>,
}

/// What the server presented.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The address connected to.
    pub address: String,
    /// Negotiated protocol version (first handshake, everything offered).
    pub protocol: String,
    /// Negotiated cipher suite.
    pub cipher: String,
    /// The chain of the first handshake, leaf first.
    pub chain: Vec<CertInfo>,
    /// Every distinct leaf seen over the handshakes: the values to pin.
    pub leaves: Vec<Leaf>,
}

/// Terminal-safe text from a certificate (a hostile server controls it): control characters
/// are shown escaped.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn name_text(n: &X509NameRef) -> String {
    n.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let val = e.data().to_string().unwrap_or_else(|_| "?".into());
            format!("{key}={}", clean(&val))
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
                    n.dnsname().map(clean).or_else(|| {
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

/// One handshake offering `ciphers` between `min` and `max`.
async fn handshake(
    addr: &str,
    sni: Option<&str>,
    min: SslVersion,
    max: SslVersion,
    ciphers: &str,
) -> Result<(String, String, Vec<CertInfo>), Error> {
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    b.set_verify(SslVerifyMode::NONE);
    b.set_security_level(0);
    b.set_cipher_list(ciphers)?;
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    b.set_min_proto_version(Some(min))?;
    b.set_max_proto_version(Some(max))?;
    let connector = b.build();
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
    Ok((
        ssl.version_str().to_owned(),
        ssl.current_cipher()
            .map_or_else(|| "?".to_owned(), |c| c.name().to_owned()),
        chain,
    ))
}

/// Connects to `addr` and reports the chain and every leaf. `sni` is sent when given (as the
/// proxy would with `upstream.sni`).
pub async fn fingerprint(
    addr: &str,
    sni: Option<&str>,
    timeout: Duration,
) -> Result<Report, Error> {
    if !crate::config::check_host_port(addr) {
        return Err(Error::Address(addr.to_owned()));
    }
    const ALL: &str = "ALL:@SECLEVEL=0";
    let work = async {
        let (protocol, cipher, chain) =
            handshake(addr, sni, SslVersion::TLS1, SslVersion::TLS1_3, ALL).await?;
        let mut leaves: Vec<Leaf> = Vec::new();
        let mut add = |label: &str, chain: &[CertInfo]| {
            let Some(leaf) = chain.first() else { return };
            match leaves.iter_mut().find(|l| l.sha256 == leaf.sha256) {
                Some(l) => l.served_to.push(label.to_owned()),
                None => leaves.push(Leaf {
                    sha256: leaf.sha256.clone(),
                    subject: leaf.subject.clone(),
                    served_to: vec![label.to_owned()],
                }),
            }
        };
        add(&format!("{protocol} {cipher}"), &chain);
        // The other key types and versions; a server without them refuses, which is fine.
        for (label, min, max, ciphers) in [
            ("TLS 1.3", SslVersion::TLS1_3, SslVersion::TLS1_3, ALL),
            (
                "TLS 1.2 RSA",
                SslVersion::TLS1,
                SslVersion::TLS1_2,
                "aRSA:@SECLEVEL=0",
            ),
            (
                "TLS 1.2 ECDSA",
                SslVersion::TLS1,
                SslVersion::TLS1_2,
                "aECDSA:@SECLEVEL=0",
            ),
        ] {
            if let Ok((_, _, c)) = handshake(addr, sni, min, max, ciphers).await {
                add(label, &c);
            }
        }
        Ok(Report {
            address: addr.to_owned(),
            protocol,
            cipher,
            chain,
            leaves,
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
    if r.leaves.is_empty() {
        let _ = writeln!(
            out,
            "\nThe server presented no certificate: nothing to pin."
        );
        return out;
    }
    if r.leaves.len() > 1 {
        let _ = writeln!(
            out,
            "\nThe server holds {} leaf certificates and picks one by the suites offered:",
            r.leaves.len()
        );
        for l in &r.leaves {
            let _ = writeln!(
                out,
                "  {}  {}  (served to: {})",
                l.sha256,
                l.subject,
                l.served_to.join(", ")
            );
        }
    }
    let pins: Vec<String> = r
        .leaves
        .iter()
        .map(|l| format!("\"{}\"", l.sha256))
        .collect();
    let _ = writeln!(
        out,
        "\nConfirm this is the server you expect (out of band), then, to accept only {}, put \
         in the config file's [upstream] (or [new_path]) section:\n  pin_sha256 = [{}]",
        if pins.len() > 1 {
            "these certificates"
        } else {
            "this certificate"
        },
        pins.join(", ")
    );
    out
}
