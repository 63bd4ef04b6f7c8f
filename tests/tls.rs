//! TLS options on every leg, over real loopback handshakes: the device acceptor's minimum
//! version and certificate chains, the new-path client's defaults (TLS 1.2+, forward-secret
//! AEAD suites, verification with a CA and the host or IP, or a pin), and
//! `cync-mitm upstream fingerprint`.

mod common;

use common::harness::certs;
use cync_mitm::config::{ClientTlsSettings, Config, NewPathTls, TlsConfig, TlsVersion};
use cync_mitm::tls::{DeviceAcceptor, TlsError, UpstreamConnector};
use openssl::ssl::{SslConnector, SslMethod, SslOptions, SslVerifyMode, SslVersion};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Command;
use tokio::net::{TcpListener, TcpStream};

/// Serves `acceptor` on 127.0.0.1:0: every connection is handshaken and then held a while.
async fn serve(acceptor: DeviceAcceptor) -> SocketAddr {
    serve_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), acceptor)
}

/// [`serve`] on a listener of the caller's.
fn serve_on(l: TcpListener, acceptor: DeviceAcceptor) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let a = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = a.accept(tcp).await {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    drop(s);
                }
            });
        }
    });
    addr
}

fn tls_cfg(min: TlsVersion) -> TlsConfig {
    TlsConfig {
        min_version: min,
        ..TlsConfig::default()
    }
}

/// A handshake from an OpenSSL client speaking `min..=max` with `ciphers` (old suites
/// allowed), verifying nothing, without SNI.
async fn handshake_with(
    addr: SocketAddr,
    min: SslVersion,
    max: SslVersion,
    ciphers: &str,
) -> Result<tokio_openssl::SslStream<TcpStream>, String> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_cipher_list(ciphers).unwrap();
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    b.set_min_proto_version(Some(min)).unwrap();
    b.set_max_proto_version(Some(max)).unwrap();
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .use_server_name_indication(false)
        .verify_hostname(false)
        .into_ssl("x")
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    Pin::new(&mut s)
        .connect()
        .await
        .map_err(|e| cync_mitm::tls::describe_ssl_error(&e))?;
    Ok(s)
}

/// The version negotiated by a client limited to exactly `v`.
async fn client_at(addr: SocketAddr, v: SslVersion, ciphers: &str) -> Result<String, String> {
    let s = handshake_with(addr, v, v, ciphers).await?;
    Ok(s.ssl().version_str().to_owned())
}

#[tokio::test]
async fn device_min_version_is_the_setting_that_decides() {
    const OLD: &str = "AES256-SHA:AES128-SHA:@SECLEVEL=0";
    let v10 = serve(DeviceAcceptor::new(&tls_cfg(TlsVersion::Tls10), certs()).unwrap()).await;
    let v11 = serve(DeviceAcceptor::new(&tls_cfg(TlsVersion::Tls11), certs()).unwrap()).await;
    let v12 = serve(DeviceAcceptor::new(&tls_cfg(TlsVersion::Tls12), certs()).unwrap()).await;
    let v13 = serve(DeviceAcceptor::new(&tls_cfg(TlsVersion::Tls13), certs()).unwrap()).await;
    // "1.0" really accepts TLS 1.0 (the Mozilla preset used to veto it silently).
    assert_eq!(
        client_at(v10, SslVersion::TLS1, OLD).await.as_deref(),
        Ok("TLSv1")
    );
    assert_eq!(
        client_at(v10, SslVersion::TLS1_1, OLD).await.as_deref(),
        Ok("TLSv1.1")
    );
    assert!(client_at(v11, SslVersion::TLS1, OLD).await.is_err());
    assert_eq!(
        client_at(v11, SslVersion::TLS1_1, OLD).await.as_deref(),
        Ok("TLSv1.1")
    );
    assert!(client_at(v12, SslVersion::TLS1_1, OLD).await.is_err());
    assert_eq!(
        client_at(v12, SslVersion::TLS1_2, "AES256-SHA256:@SECLEVEL=0")
            .await
            .as_deref(),
        Ok("TLSv1.2")
    );
    assert!(
        client_at(v13, SslVersion::TLS1_2, "AES256-SHA256:@SECLEVEL=0")
            .await
            .is_err()
    );
    assert_eq!(
        client_at(v13, SslVersion::TLS1_3, "DEFAULT")
            .await
            .as_deref(),
        Ok("TLSv1.3")
    );
}

/// The chain the server sends for a client offering `ciphers`: (leaf key type, DER of each).
async fn chain_for(addr: SocketAddr, ciphers: &str) -> (openssl::pkey::Id, Vec<Vec<u8>>) {
    let s = handshake_with(addr, SslVersion::TLS1_2, SslVersion::TLS1_2, ciphers)
        .await
        .unwrap();
    let chain = s.ssl().peer_cert_chain().unwrap();
    let leaf = chain.get(0).unwrap().public_key().unwrap().id();
    (leaf, chain.iter().map(|c| c.to_der().unwrap()).collect())
}

#[tokio::test]
async fn each_handshake_sends_its_leaf_and_the_ca_once() {
    assert!(TlsConfig::default().ecdsa, "both leaves are served");
    let addr = serve(DeviceAcceptor::new(&TlsConfig::default(), certs()).unwrap()).await;
    let ca = openssl::x509::X509::from_pem(&std::fs::read(&certs().ca_cert).unwrap())
        .unwrap()
        .to_der()
        .unwrap();
    for (ciphers, want) in [
        ("AES256-SHA256:@SECLEVEL=0", openssl::pkey::Id::RSA),
        ("ECDHE-ECDSA-AES256-GCM-SHA384", openssl::pkey::Id::EC),
    ] {
        let (leaf, chain) = chain_for(addr, ciphers).await;
        assert_eq!(leaf, want, "{ciphers}");
        assert_eq!(chain.len(), 2, "{ciphers}: leaf + CA, the CA once");
        assert_eq!(chain[1], ca, "{ciphers}");
    }
}

fn new_path(f: impl FnOnce(&mut cync_mitm::config::NewPathConfig)) -> ClientTlsSettings {
    let mut n = Config::default().new_path;
    f(&mut n);
    n.client_tls()
}

fn new_path_in(
    mode: NewPathTls,
    f: impl FnOnce(&mut cync_mitm::config::NewPathConfig),
) -> ClientTlsSettings {
    new_path(|n| {
        n.tls = mode;
        f(n)
    })
}

/// Both new-path engines: `modern` (rustls, the default) and `legacy` (OpenSSL).
const MODES: [NewPathTls; 2] = [NewPathTls::Modern, NewPathTls::Legacy];

/// A suite name, OpenSSL's (`ECDHE-RSA-AES256-GCM-SHA384`) or rustls's
/// (`TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384`), reduced to its parts.
fn suite(s: &str) -> String {
    s.to_ascii_uppercase()
        .replace("TLS_", "")
        .replace("_WITH", "")
        .replace("AES_", "AES")
        .replace(['-', '_'], "")
}

async fn connect(s: &ClientTlsSettings, addr: SocketAddr, host: &str) -> Result<String, TlsError> {
    let c = UpstreamConnector::new(s)?;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let s = c.connect(tcp, host).await?;
    Ok(format!("{} {}", s.protocol(), s.cipher()))
}

#[tokio::test]
async fn new_path_client_verifies_the_chain_and_the_name_or_the_pin() {
    for mode in MODES {
        verifies_chain_name_or_pin(mode).await;
    }
}

async fn verifies_chain_name_or_pin(mode: NewPathTls) {
    let addr = serve(DeviceAcceptor::new(&TlsConfig::default(), certs()).unwrap()).await;
    let ca = certs().ca_cert.clone();

    // CA + SNI naming the certificate: verified, over a modern suite.
    let ok = new_path_in(mode, |n| {
        n.ca_file = Some(ca.clone());
        n.sni = Some("cm.gelighting.com".into());
    });
    let got = connect(&ok, addr, "127.0.0.1").await.unwrap();
    assert!(got.starts_with("TLSv1.3 "), "{mode:?}: {got}");
    // Capped at TLS 1.2 the server must pick a forward-secret suite.
    let mut ok12 = ok.clone();
    ok12.min_version = TlsVersion::Tls12;
    let rsa_12 = serve_raw(
        SslVersion::TLS1_2,
        SslVersion::TLS1_2,
        "AES256-SHA256:ECDHE-RSA-AES256-GCM-SHA384:@SECLEVEL=0",
    )
    .await;
    let got = connect(&ok12, rsa_12, "cm.gelighting.com").await.unwrap();
    assert!(suite(&got).contains("ECDHERSAAES256GCM"), "{mode:?}: {got}");

    // CA but no SNI: the address's host is checked; the certificate has no IP in its names.
    let by_ip = new_path_in(mode, |n| n.ca_file = Some(ca.clone()));
    let e = connect(&by_ip, addr, "127.0.0.1").await.unwrap_err();
    assert!(e.to_string().contains("certificate verify failed"), "{e}");
    assert!(
        e.to_string().contains("IP address mismatch"),
        "{mode:?}: {e}"
    );
    // ... and a host name it does cover passes.
    connect(&by_ip, addr, "cm-sec.gelighting.com")
        .await
        .unwrap();
    // A name it does not cover fails.
    let e = connect(&by_ip, addr, "evil.example").await.unwrap_err();
    assert!(e.to_string().contains("hostname mismatch"), "{mode:?}: {e}");

    // Another CA: refused.
    let other = tempfile::tempdir().unwrap();
    let other = cync_mitm::tls::init_certs(other.path(), false).unwrap();
    let wrong_ca = new_path_in(mode, |n| {
        n.ca_file = Some(other.ca_cert.clone());
        n.sni = Some("cm.gelighting.com".into());
    });
    let e = connect(&wrong_ca, addr, "127.0.0.1").await.unwrap_err();
    assert!(e.to_string().contains("certificate verify failed"), "{e}");
    eprintln!("{mode:?} wrong CA: {e}");

    // Pin only (verify stays on): the pin is the check, with any name.
    let leaf = openssl::x509::X509::stack_from_pem(&std::fs::read(&certs().rsa_cert).unwrap())
        .unwrap()
        .remove(0);
    let pin = cync_mitm::tls::cert_sha256_hex(&leaf.to_der().unwrap());
    // The server picks its RSA or ECDSA leaf by the suite; pin both to stay independent of
    // its preference.
    let ecdsa = openssl::x509::X509::stack_from_pem(&std::fs::read(&certs().ecdsa_cert).unwrap())
        .unwrap()
        .remove(0);
    let ecdsa_pin = cync_mitm::tls::cert_sha256_hex(&ecdsa.to_der().unwrap());
    let both = new_path_in(mode, |n| {
        n.pin_sha256 = vec![pin.clone(), ecdsa_pin.clone()]
    });
    connect(&both, addr, "127.0.0.1").await.unwrap();
    let wrong_pin = new_path_in(mode, |n| n.pin_sha256 = vec!["00".repeat(32)]);
    let e = connect(&wrong_pin, addr, "127.0.0.1").await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TlsError::PinMismatch { .. }), "{msg}");
    assert!(msg.contains("add \""), "the message says how to pin: {msg}");
    assert!(msg.contains("upstream fingerprint"), "{msg}");
}

#[tokio::test]
async fn new_path_client_refuses_old_versions_and_static_rsa() {
    // A backend that only speaks the cloud's static-RSA suites, or only TLS 1.1.
    let rsa_only = serve_raw(
        SslVersion::TLS1_2,
        SslVersion::TLS1_2,
        "AES256-SHA256:AES128-SHA:@SECLEVEL=0",
    )
    .await;
    let insecure = new_path(|n| n.verify = false);
    // The new path's defaults, in either mode, share nothing with a static-RSA-only TLS 1.2
    // server.
    for mode in MODES {
        let s = new_path(|n| {
            n.verify = false;
            n.tls = mode;
        });
        let e = connect(&s, rsa_only, "127.0.0.1").await.unwrap_err();
        assert!(matches!(e, TlsError::Handshake(_)), "{mode:?}: {e}");
    }
    // The upstream's (cloud-compatible) defaults still reach it.
    let upstream = Config::default().upstream.client_tls();
    let got = connect(&upstream, rsa_only, "127.0.0.1").await.unwrap();
    assert!(got.contains("AES256-SHA256"), "{got}");

    // A server that speaks only TLS 1.1 is refused by both defaults (min_version "1.2"), and
    // reached once a section allows 1.1.
    let only11 = serve_raw(
        SslVersion::TLS1_1,
        SslVersion::TLS1_1,
        "AES256-SHA:ECDHE-RSA-AES256-SHA:@SECLEVEL=0",
    )
    .await;
    assert!(connect(&insecure, only11, "127.0.0.1").await.is_err());
    let legacy_insecure = new_path(|n| {
        n.verify = false;
        n.tls = NewPathTls::Legacy;
    });
    assert!(
        connect(&legacy_insecure, only11, "127.0.0.1")
            .await
            .is_err()
    );
    assert!(connect(&upstream, only11, "127.0.0.1").await.is_err());
    let mut allow = upstream.clone();
    allow.min_version = TlsVersion::Tls11;
    let got = connect(&allow, only11, "127.0.0.1").await.unwrap();
    assert!(got.starts_with("TLSv1.1"), "{got}");
}

/// A raw OpenSSL server (RSA leaf) speaking only versions `min..=max` and suites `ciphers`.
async fn serve_raw(min: SslVersion, max: SslVersion, ciphers: &str) -> SocketAddr {
    use openssl::ssl::SslAcceptor;
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
    b.set_security_level(0);
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    b.set_cipher_list(ciphers).unwrap();
    b.set_min_proto_version(Some(min)).unwrap();
    b.set_max_proto_version(Some(max)).unwrap();
    b.set_certificate_chain_file(&certs().rsa_cert).unwrap();
    b.set_private_key_file(&certs().rsa_key, openssl::ssl::SslFiletype::PEM)
        .unwrap();
    serve_openssl(b.build()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_prints_the_pins_that_the_proxy_accepts() {
    // cync-mitm's own acceptor holds an RSA and an ECDSA leaf and picks one by suite.
    let addr = serve(DeviceAcceptor::new(&TlsConfig::default(), certs()).unwrap()).await;
    let sha = |f: &std::path::Path| {
        let c = openssl::x509::X509::stack_from_pem(&std::fs::read(f).unwrap())
            .unwrap()
            .remove(0);
        cync_mitm::tls::cert_sha256_hex(&c.to_der().unwrap())
    };
    let want = sha(&certs().rsa_cert);
    let want_ec = sha(&certs().ecdsa_cert);
    let bin = env!("CARGO_BIN_EXE_cync-mitm");
    let a = addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["upstream", "fingerprint", &a])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("pin_sha256 = [\"{want_ec}\", \"{want}\"]"))
            || text.contains(&format!("pin_sha256 = [\"{want}\", \"{want_ec}\"]")),
        "both leaves are to be pinned: {text}"
    );
    assert!(text.contains("cm.gelighting.com"), "names listed: {text}");

    let a = addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["upstream", "fingerprint", &a, "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["chain"].as_array().map(Vec::len), Some(2));
    let mut leaves: Vec<String> = v["leaves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["sha256"].as_str().unwrap().to_owned())
        .collect();
    leaves.sort();
    let mut both = vec![want.clone(), want_ec.clone()];
    both.sort();
    assert_eq!(leaves, both);

    // The printed values are what both legs' connectors accept, whichever leaf they get.
    let pinned = new_path(|n| n.pin_sha256 = both.clone());
    connect(&pinned, addr, "127.0.0.1").await.unwrap();
    let mut upstream = Config::default().upstream.client_tls();
    upstream.pin_sha256 = both.clone();
    connect(&upstream, addr, "127.0.0.1").await.unwrap();
    // Pinning only the RSA leaf (what a one-handshake tool would print) fails the new path,
    // whose suites make the server pick the other one.
    let rsa_only = new_path(|n| n.pin_sha256 = vec![want.clone()]);
    let e = connect(&rsa_only, addr, "127.0.0.1").await;
    let ec_only = new_path(|n| n.pin_sha256 = vec![want_ec.clone()]);
    let f = connect(&ec_only, addr, "127.0.0.1").await;
    assert!(
        e.is_ok() != f.is_ok(),
        "exactly one leaf is served to the new path"
    );

    // Nothing listening: a clear error, exit 2.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["upstream", "fingerprint", &dead_addr, "--timeout", "2s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect"));
}

/// A CA and an RSA leaf for `names` (IPs become IP SANs), laid out as the acceptor expects.
fn mint_for(names: &[&str]) -> (tempfile::TempDir, cync_mitm::tls::CertPaths) {
    let dir = tempfile::tempdir().unwrap();
    let paths = cync_mitm::tls::CertPaths::in_dir(dir.path());
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
    std::fs::write(&paths.ca_cert, ca_cert.pem()).unwrap();
    std::fs::write(&paths.rsa_cert, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&paths.rsa_key, key.serialize_pem()).unwrap();
    (dir, paths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_by_address_checks_ips_and_sends_dns_names_as_sni() {
    let (_d, paths) = mint_for(&["127.0.0.1", "::1", "backend.test"]);
    let acceptor = DeviceAcceptor::new(
        &TlsConfig {
            ecdsa: false,
            ..TlsConfig::default()
        },
        &paths,
    )
    .unwrap();
    let v4 = serve(acceptor.clone()).await;
    for mode in MODES {
        let n = new_path(|n| {
            n.ca_file = Some(paths.ca_cert.clone());
            n.tls = mode;
        });
        // The IP of the address is what is checked (no sni).
        connect(&n, v4, "127.0.0.1").await.unwrap();
        let e = connect(&n, v4, "127.0.0.2").await.unwrap_err();
        assert!(e.to_string().contains("IP address mismatch"), "{e}");
        // IPv6 in brackets, as in "[::1]:port", through the proxy's own connect path.
        if let Ok(l6) = TcpListener::bind("[::1]:0").await {
            let a6 = serve_on(l6, acceptor.clone());
            assert_eq!(
                cync_mitm::proxy::upstream::host_of(&a6.to_string()),
                "[::1]"
            );
            connect(&n, a6, cync_mitm::proxy::upstream::host_of(&a6.to_string()))
                .await
                .unwrap();
        }
        // A DNS name in the address is verified and sent as SNI: a server that answers only
        // when asked for its name accepts it.
        let sni_only = serve_requiring_sni("backend.test", &paths).await;
        connect(&n, sni_only, "backend.test").await.unwrap();
    }
}

/// An OpenSSL server that refuses handshakes whose SNI is not `name`.
async fn serve_requiring_sni(name: &'static str, paths: &cync_mitm::tls::CertPaths) -> SocketAddr {
    use openssl::ssl::{SniError, SslAcceptor};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
    b.set_certificate_chain_file(&paths.rsa_cert).unwrap();
    b.set_private_key_file(&paths.rsa_key, openssl::ssl::SslFiletype::PEM)
        .unwrap();
    b.set_servername_callback(move |ssl, _| {
        match ssl.servername(openssl::ssl::NameType::HOST_NAME) {
            Some(n) if n == name => Ok(()),
            _ => Err(SniError::ALERT_FATAL),
        }
    });
    serve_openssl(b.build()).await
}

/// Serves a raw OpenSSL acceptor on 127.0.0.1:0: each connection is handshaken, then held.
async fn serve_openssl(acc: openssl::ssl::SslAcceptor) -> SocketAddr {
    let acc = std::sync::Arc::new(acc);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acc = acc.clone();
            tokio::spawn(async move {
                let Ok(ssl) = openssl::ssl::Ssl::new(acc.context()) else {
                    return;
                };
                let Ok(mut s) = tokio_openssl::SslStream::new(ssl, tcp) else {
                    return;
                };
                if Pin::new(&mut s).accept().await.is_ok() {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
            });
        }
    });
    addr
}
