//! TLS for every leg: the project CA and leaf certificates (minted with rcgen), the OpenSSL
//! acceptor for devices and connector for the cloud (the legacy suites real devices and the cloud
//! speak, reference §1.3), certificate pinning, and rustls for the modern legs we control.
//!
//! Each leg sits behind one small type (`DeviceAcceptor`, `UpstreamConnector`, `LegacyClient`,
//! `ModernServer`), so a TLS stack can be swapped in one place.

use crate::config::{ClientTlsSettings, TlsConfig, TlsVersion, parse_pin};
use openssl::pkey::PKey;
use openssl::ssl::{
    Ssl, SslAcceptor, SslConnector, SslContext, SslContextBuilder, SslMethod, SslVerifyMode,
    SslVersion,
};
use openssl::x509::X509;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

/// Host names the device leaf certificate covers (the names users redirect in DNS).
pub const LEAF_NAMES: [&str; 4] = [
    "cm.gelighting.com",
    "cm-sec.gelighting.com",
    "cm-ge.xlink.cn",
    "*.xlink.cn",
];

/// TLS errors, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate files exist and `--force` was not given.
    #[error("certificates already exist in {0} (use --force to replace them)")]
    Exists(PathBuf),
    /// Reading or writing certificate files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Minting certificates.
    #[error("minting certificates: {0}")]
    Mint(#[from] rcgen::Error),
    /// OpenSSL setup.
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    /// rustls setup.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A handshake failed.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The peer's certificate is not one of the pinned ones.
    #[error(
        "certificate sha256 {got} matches no pin_sha256 entry. If the server's certificate was \
         replaced on purpose (confirm it out of band: from the server itself, not over this \
         network), pin the new one: add \"{got}\" to pin_sha256 (`cync-mitm upstream \
         fingerprint HOST:PORT` shows the certificate)"
    )]
    PinMismatch {
        /// Hex SHA-256 of the certificate presented.
        got: String,
    },
    /// A PEM file held nothing usable.
    #[error("{0}: no usable PEM item")]
    Pem(PathBuf),
    /// OpenSSL refused a certificate or key file.
    #[error("{path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The error.
        source: openssl::error::ErrorStack,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

// === key log ===

static KEYLOG: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// Starts appending the TLS secrets of every OpenSSL leg built after this call to `path`, in NSS
/// key-log format (created 0600). Once per process.
pub fn enable_keylog(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(path))?;
    let _ = KEYLOG.set(std::sync::Mutex::new(f));
    Ok(())
}

/// Whether a key log is being written.
pub fn keylog_enabled() -> bool {
    KEYLOG.get().is_some()
}

fn attach_keylog(b: &mut SslContextBuilder) {
    if KEYLOG.get().is_none() {
        return;
    }
    b.set_keylog_callback(|_, line| {
        if let Some(m) = KEYLOG.get() {
            let mut f = m.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{line}");
        }
    });
}

// === certificates ===

/// The files `certs init` writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// CA private key (PEM, 0600).
    pub ca_key: PathBuf,
    /// RSA-2048 leaf certificate followed by the CA (PEM).
    pub rsa_cert: PathBuf,
    /// RSA leaf key (PEM, 0600).
    pub rsa_key: PathBuf,
    /// ECDSA P-256 leaf certificate followed by the CA (PEM).
    pub ecdsa_cert: PathBuf,
    /// ECDSA leaf key (PEM, 0600).
    pub ecdsa_key: PathBuf,
}

impl CertPaths {
    /// File names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            rsa_cert: dir.join("server-rsa.pem"),
            rsa_key: dir.join("server-rsa-key.pem"),
            ecdsa_cert: dir.join("server-ecdsa.pem"),
            ecdsa_key: dir.join("server-ecdsa-key.pem"),
        }
    }

    fn all(&self) -> [&PathBuf; 6] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.rsa_cert,
            &self.rsa_key,
            &self.ecdsa_cert,
            &self.ecdsa_key,
        ]
    }

    /// Whether every file exists.
    pub fn complete(&self) -> bool {
        self.all().iter().all(|p| p.exists())
    }
}

fn write_file(path: &Path, data: &str, private: bool) -> Result<(), TlsError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    opts.mode(if private { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(io_err(path))?;
    // An existing file keeps its old mode on open: set it explicitly.
    use std::os::unix::fs::PermissionsExt as _;
    f.set_permissions(std::fs::Permissions::from_mode(if private {
        0o600
    } else {
        0o644
    }))
    .map_err(io_err(path))?;
    f.write_all(data.as_bytes()).map_err(io_err(path))
}

fn validity(params: &mut rcgen::CertificateParams) {
    // Devices may have no clock: valid from the epoch until far in the future.
    params.not_before = rcgen::date_time_ymd(1970, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
}

/// Mints the CA and both leaves into `dir`. Refuses to overwrite unless `force`.
pub fn init_certs(dir: &Path, force: bool) -> Result<CertPaths, TlsError> {
    let paths = CertPaths::in_dir(dir);
    if !force && paths.all().iter().any(|p| p.exists()) {
        return Err(TlsError::Exists(dir.to_owned()));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;

    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cync-mitm local CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);

    let leaf = |alg: &'static rcgen::SignatureAlgorithm| -> Result<(String, String), TlsError> {
        let key = rcgen::KeyPair::generate_for(alg)?;
        let mut p = rcgen::CertificateParams::new(
            LEAF_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, LEAF_NAMES[0]);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut p);
        let cert = p.signed_by(&key, &issuer)?;
        Ok((
            format!("{}{}", cert.pem(), ca_cert.pem()),
            key.serialize_pem(),
        ))
    };
    let (rsa_cert, rsa_key) = leaf(&rcgen::PKCS_RSA_SHA256)?;
    let (ec_cert, ec_key) = leaf(&rcgen::PKCS_ECDSA_P256_SHA256)?;

    write_file(&paths.ca_cert, &ca_cert.pem(), false)?;
    write_file(&paths.ca_key, &ca_key.serialize_pem(), true)?;
    write_file(&paths.rsa_cert, &rsa_cert, false)?;
    write_file(&paths.rsa_key, &rsa_key, true)?;
    write_file(&paths.ecdsa_cert, &ec_cert, false)?;
    write_file(&paths.ecdsa_key, &ec_key, true)?;
    Ok(paths)
}

/// Uses the certificates in `dir`, minting them first when any is missing. Returns whether they
/// were created.
pub fn ensure_certs(dir: &Path) -> Result<(CertPaths, bool), TlsError> {
    let paths = CertPaths::in_dir(dir);
    if paths.complete() {
        return Ok((paths, false));
    }
    Ok((init_certs(dir, true)?, true))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(io_err(path))
}

/// Loads a leaf with its chain and key. The chain belongs to this leaf (OpenSSL keeps one per
/// key type), not to the context: with an RSA and an ECDSA leaf signed by one CA, each
/// handshake sends the leaf it picked and the CA once.
fn load_chain(ctx: &mut SslContextBuilder, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let load = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Load { path, source }
    };
    // Read first: a missing file gets the plain I/O error, an empty one a clear message.
    if X509::stack_from_pem(&read(cert)?)
        .map_err(load(cert))?
        .is_empty()
    {
        return Err(TlsError::Pem(cert.to_owned()));
    }
    let pkey = PKey::private_key_from_pem(&read(key)?).map_err(load(key))?;
    ctx.set_certificate_chain_file(cert).map_err(load(cert))?;
    ctx.set_private_key(&pkey).map_err(load(key))?;
    ctx.check_private_key().map_err(load(key))?;
    Ok(())
}

fn ssl_version(v: TlsVersion) -> SslVersion {
    match v {
        TlsVersion::Tls10 => SslVersion::TLS1,
        TlsVersion::Tls11 => SslVersion::TLS1_1,
        TlsVersion::Tls12 => SslVersion::TLS1_2,
        TlsVersion::Tls13 => SslVersion::TLS1_3,
    }
}

/// SHA-256 of a certificate's DER, in hex.
pub fn cert_sha256_hex(der: &[u8]) -> String {
    crate::hexutil::to_hex(&openssl::sha::sha256(der))
}

/// An established OpenSSL stream.
pub type OsslStream<S> = SslStream<S>;

/// Accepts device TLS with the legacy suites (static-RSA CBC/CCM, ECDHE-ECDSA) and modern ones.
#[derive(Clone)]
pub struct DeviceAcceptor {
    ctx: SslContext,
}

impl DeviceAcceptor {
    /// Builds the acceptor from `[tls]` and the certificates in `paths`.
    pub fn new(cfg: &TlsConfig, paths: &CertPaths) -> Result<Self, TlsError> {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        b.set_security_level(0);
        b.set_cipher_list(&cfg.ciphers)?;
        // The Mozilla preset also disables TLS 1.0 and 1.1 by option flags, which win over the
        // minimum version: clear them so `min_version` is the one setting that decides.
        b.clear_options(openssl::ssl::SslOptions::NO_TLSV1 | openssl::ssl::SslOptions::NO_TLSV1_1);
        b.set_min_proto_version(Some(ssl_version(cfg.min_version)))?;
        b.set_options(openssl::ssl::SslOptions::CIPHER_SERVER_PREFERENCE);
        // Idle device sessions are the norm: free OpenSSL's record buffers between reads.
        b.set_mode(openssl::ssl::SslMode::RELEASE_BUFFERS);
        attach_keylog(&mut b);
        load_chain(&mut b, &paths.rsa_cert, &paths.rsa_key)?;
        if cfg.ecdsa {
            load_chain(&mut b, &paths.ecdsa_cert, &paths.ecdsa_key)?;
        }
        Ok(Self {
            ctx: b.build().into_context(),
        })
    }

    /// Runs the server handshake on `stream`.
    pub async fn accept<S>(&self, stream: S) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ssl = Ssl::new(&self.ctx)?;
        let mut s = SslStream::new(ssl, stream)?;
        Pin::new(&mut s)
            .accept()
            .await
            .map_err(|e| TlsError::Handshake(describe_ssl_error(&e)))?;
        Ok(s)
    }
}

/// A short, stable reason for a handshake failure (used as a metrics label).
pub fn describe_ssl_error(e: &openssl::ssl::Error) -> String {
    if let Some(io) = e.io_error() {
        return format!("io: {}", io.kind());
    }
    match e.ssl_error() {
        Some(stack) => stack
            .errors()
            .first()
            .and_then(|x| x.reason())
            .unwrap_or("tls error")
            .to_owned(),
        None if e.code() == openssl::ssl::ErrorCode::ZERO_RETURN => "closed".into(),
        None if e.code() == openssl::ssl::ErrorCode::SYSCALL => "eof".into(),
        None => format!("ssl error {:?}", e.code()),
    }
}

/// The TLS library of a client leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// OpenSSL, with a configurable cipher list (the cloud's legacy suites).
    OpenSsl,
    /// rustls: TLS 1.2/1.3, forward-secret AEAD suites only.
    Rustls,
}

/// Connects to the cloud (or another upstream) over OpenSSL, or to a modern backend over
/// rustls, with optional pinning.
#[derive(Clone)]
pub struct UpstreamConnector {
    engine: EngineCtx,
    settings: ClientTlsSettings,
    pins: Vec<[u8; 32]>,
    ca_digest: Option<[u8; 32]>,
}

#[derive(Clone)]
enum EngineCtx {
    OpenSsl(SslContext),
    Rustls(tokio_rustls::TlsConnector),
}

/// SHA-256 of the CA file `settings` names, when it is read for verification.
pub fn ca_file_digest(settings: &ClientTlsSettings) -> Option<[u8; 32]> {
    let ca = settings.ca_file.as_ref().filter(|_| settings.verify)?;
    std::fs::read(ca).ok().map(|b| openssl::sha::sha256(&b))
}

/// Accepts any certificate but checks the handshake signatures: with pins, the pin is checked
/// on the certificate once the handshake is done (before a byte of data is sent); without,
/// `verify = false` asked for no check.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Writes rustls secrets to the key log, in NSS format.
#[derive(Debug)]
struct RustlsKeyLog;

impl rustls::KeyLog for RustlsKeyLog {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        if let Some(m) = KEYLOG.get() {
            let mut f = m.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                f,
                "{label} {} {}",
                crate::hexutil::to_hex(client_random),
                crate::hexutil::to_hex(secret)
            );
        }
    }
}

fn rustls_connector(cfg: &ClientTlsSettings) -> Result<tokio_rustls::TlsConnector, TlsError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if cfg.min_version >= TlsVersion::Tls13 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?;
    let mut c = match (&cfg.ca_file, cfg.verify) {
        (Some(ca), true) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .map_err(|_| TlsError::Pem(ca.clone()))?
                .collect::<Result<_, _>>()
                .map_err(|_| TlsError::Pem(ca.clone()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::Pem(ca.clone()));
            }
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| TlsError::Handshake(format!("{}: {e}", ca.display())))?;
            b.with_webpki_verifier(v).with_no_client_auth()
        }
        _ => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
    };
    if KEYLOG.get().is_some() {
        c.key_log = Arc::new(RustlsKeyLog);
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(c)))
}

/// What a rustls handshake error says, in the words the OpenSSL leg uses where they apply.
fn describe_rustls_error(e: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    let rustls::Error::InvalidCertificate(c) = r else {
        return r.to_string();
    };
    let why = match c {
        C::NotValidForNameContext {
            expected,
            presented,
        } => {
            let what = match expected {
                rustls::pki_types::ServerName::IpAddress(_) => "IP address mismatch",
                _ => "hostname mismatch",
            };
            format!(
                "{what}: {} is not among the certificate's names ({})",
                match expected {
                    rustls::pki_types::ServerName::IpAddress(ip) =>
                        std::net::IpAddr::from(*ip).to_string(),
                    other => other.to_str().into_owned(),
                },
                presented.join(", ")
            )
        }
        C::NotValidForName => "hostname mismatch".into(),
        C::UnknownIssuer => "unknown issuer: not signed by a CA in ca_file".into(),
        C::BadSignature => "certificate signature failure".into(),
        C::Expired | C::ExpiredContext { .. } => "certificate has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "certificate is not yet valid".into(),
        other => format!("{other:?}"),
    };
    format!("certificate verify failed: {why}")
}

impl UpstreamConnector {
    /// The settings it was built from (a reload reuses the connector when they are unchanged).
    pub fn settings(&self) -> &ClientTlsSettings {
        &self.settings
    }

    /// SHA-256 of the CA file as it was loaded (a reload rebuilds the connector when the file
    /// changed, even under the same name).
    pub fn ca_digest(&self) -> Option<[u8; 32]> {
        self.ca_digest
    }

    /// Builds the connector from `[upstream]` or `[new_path]` settings.
    ///
    /// With `verify` and a `ca_file`, the chain must lead to a CA in that file (the system store
    /// is not loaded: the cloud's certificate is self-signed, and a new backend has its own CA)
    /// and the name must match (`sni`, or else the address's host or IP). With `verify` and only
    /// pins, the pin is the check. OpenSSL: the security level is what the cipher list says (the
    /// upstream's default list carries `@SECLEVEL=0` for the cloud's static-RSA suites; the new
    /// path's keeps OpenSSL's default), except that asking for TLS 1.0 or 1.1 (upstream only)
    /// sets level 0, the only one at which OpenSSL 3 speaks them. rustls: its own suites (all
    /// forward-secret AEAD), TLS 1.2 or 1.3; `ciphers` does not apply.
    pub fn new(cfg: &ClientTlsSettings) -> Result<Self, TlsError> {
        let engine = match cfg.engine {
            Engine::OpenSsl => EngineCtx::OpenSsl(openssl_context(cfg)?),
            Engine::Rustls => EngineCtx::Rustls(rustls_connector(cfg)?),
        };
        Ok(Self {
            engine,
            settings: cfg.clone(),
            pins: cfg.pin_sha256.iter().filter_map(|p| parse_pin(p)).collect(),
            ca_digest: ca_file_digest(cfg),
        })
    }

    fn check_pins(&self, der: Option<&[u8]>) -> Result<(), TlsError> {
        if self.pins.is_empty() {
            return Ok(());
        }
        let der = der.ok_or_else(|| TlsError::Handshake("no peer certificate".into()))?;
        let got = openssl::sha::sha256(der);
        if !self.pins.contains(&got) {
            return Err(TlsError::PinMismatch {
                got: crate::hexutil::to_hex(&got),
            });
        }
        Ok(())
    }

    /// Runs the client handshake on `stream` to `host` (the address's host part, the name or IP
    /// checked when verifying without `sni`) and checks the pins.
    pub async fn connect<S>(&self, stream: S, host: &str) -> Result<ClientStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match &self.engine {
            EngineCtx::OpenSsl(ctx) => {
                let s = self.connect_openssl(ctx, stream, host).await?;
                Ok(ClientStream::OpenSsl(s))
            }
            EngineCtx::Rustls(c) => {
                let name = self.settings.sni.as_deref().unwrap_or(host);
                let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
                    .map_err(|_| {
                        TlsError::Handshake(format!(
                            "{name:?} is neither a host name nor an IP address to verify"
                        ))
                    })?;
                let s = c
                    .connect(server_name, stream)
                    .await
                    .map_err(|e| TlsError::Handshake(describe_rustls_error(&e)))?;
                let der = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec());
                self.check_pins(der.as_deref())?;
                Ok(ClientStream::Rustls(Box::new(s)))
            }
        }
    }

    async fn connect_openssl<S>(
        &self,
        ctx: &SslContext,
        stream: S,
        host: &str,
    ) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut ssl = Ssl::new(ctx)?;
        // `sni` was checked by config validation (a name or an IP, no NUL): these cannot panic.
        if let Some(name) = &self.settings.sni {
            ssl.set_hostname(name)?;
        }
        let verifying = self.settings.verify && self.settings.ca_file.is_some();
        if verifying {
            let name = self.settings.sni.as_deref().unwrap_or(host);
            match name.parse::<std::net::IpAddr>() {
                Ok(ip) => ssl.param_mut().set_ip(ip)?,
                Err(_) if crate::config::is_dns_name(name) => {
                    ssl.param_mut().set_host(name)?;
                    // The name verified is also the one asked for, so a backend behind an SNI
                    // router serves the right certificate.
                    if self.settings.sni.is_none() {
                        ssl.set_hostname(name)?;
                    }
                }
                Err(_) => {
                    return Err(TlsError::Handshake(format!(
                        "{name:?} is neither a host name nor an IP address to verify"
                    )));
                }
            }
        }
        let mut s = SslStream::new(ssl, stream)?;
        if let Err(e) = Pin::new(&mut s).connect().await {
            // Say what verification found (a name mismatch, an unknown CA, a bad signature)
            // rather than the last OpenSSL reason on the stack. Only when verifying: OpenSSL
            // records a result even when told not to act on it.
            let v = s.ssl().verify_result();
            if verifying && v != openssl::x509::X509VerifyResult::OK {
                return Err(TlsError::Handshake(format!(
                    "certificate verify failed: {}",
                    v.error_string()
                )));
            }
            return Err(TlsError::Handshake(describe_ssl_error(&e)));
        }
        let der = match s.ssl().peer_certificate() {
            Some(c) => Some(c.to_der()?),
            None => None,
        };
        self.check_pins(der.as_deref())?;
        Ok(s)
    }
}

/// A client TLS stream of either engine.
pub enum ClientStream<S> {
    /// OpenSSL.
    OpenSsl(SslStream<S>),
    /// rustls.
    Rustls(Box<tokio_rustls::client::TlsStream<S>>),
}

impl<S> ClientStream<S> {
    /// The negotiated protocol version, such as `TLSv1.3`.
    pub fn protocol(&self) -> String {
        match self {
            ClientStream::OpenSsl(s) => s.ssl().version_str().to_owned(),
            ClientStream::Rustls(s) => match s.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
                Some(v) => format!("{v:?}"),
                None => "?".into(),
            },
        }
    }

    /// The negotiated cipher suite (each library's own name for it).
    pub fn cipher(&self) -> String {
        match self {
            ClientStream::OpenSsl(s) => s
                .ssl()
                .current_cipher()
                .map(|c| c.name().to_owned())
                .unwrap_or_else(|| "?".into()),
            ClientStream::Rustls(s) => s
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_else(|| "?".into()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::OpenSsl(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Rustls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::OpenSsl(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Rustls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::OpenSsl(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Rustls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::OpenSsl(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Rustls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn openssl_context(cfg: &ClientTlsSettings) -> Result<SslContext, TlsError> {
    let mut b = SslContextBuilder::new(SslMethod::tls_client())?;
    if cfg.min_version < TlsVersion::Tls12 {
        b.set_security_level(0);
        b.clear_options(openssl::ssl::SslOptions::NO_TLSV1 | openssl::ssl::SslOptions::NO_TLSV1_1);
    }
    b.set_cipher_list(&cfg.ciphers)?;
    b.set_min_proto_version(Some(ssl_version(cfg.min_version)))?;
    b.set_mode(openssl::ssl::SslMode::RELEASE_BUFFERS);
    attach_keylog(&mut b);
    match (&cfg.ca_file, cfg.verify) {
        (Some(ca), true) => {
            b.set_ca_file(ca).map_err(|source| TlsError::Load {
                path: ca.clone(),
                source,
            })?;
            b.set_verify(SslVerifyMode::PEER);
        }
        _ => b.set_verify(SslVerifyMode::NONE),
    }
    Ok(b.build())
}

/// Which suites a simulated or test client offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientProfile {
    /// Like device fingerprint 2: TLS 1.2, static-RSA AES-CBC only, no SNI.
    DeviceFp2,
    /// Only AES256-SHA256, TLS 1.2, no SNI.
    Aes256Sha256Only,
    /// Whatever OpenSSL offers by default (TLS 1.3 and AEAD suites).
    Modern,
}

/// An OpenSSL client used by the device simulator and tests.
#[derive(Clone)]
pub struct LegacyClient {
    connector: Arc<SslConnector>,
}

impl LegacyClient {
    /// A client offering `profile`'s suites, verifying nothing.
    pub fn new(profile: ClientProfile) -> Result<Self, TlsError> {
        let mut b = SslConnector::builder(SslMethod::tls_client())?;
        b.set_verify(SslVerifyMode::NONE);
        b.set_security_level(0);
        match profile {
            ClientProfile::DeviceFp2 => {
                b.set_cipher_list("AES256-SHA256:AES256-SHA:AES128-SHA256:AES128-SHA")?;
                b.set_max_proto_version(Some(SslVersion::TLS1_2))?;
            }
            ClientProfile::Aes256Sha256Only => {
                b.set_cipher_list("AES256-SHA256")?;
                b.set_max_proto_version(Some(SslVersion::TLS1_2))?;
            }
            ClientProfile::Modern => {}
        }
        Ok(Self {
            connector: Arc::new(b.build()),
        })
    }

    /// Handshakes on `stream` without SNI.
    pub async fn connect<S>(&self, stream: S) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ssl = self
            .connector
            .configure()?
            .use_server_name_indication(false)
            .verify_hostname(false)
            .into_ssl("cm.gelighting.com")?;
        let mut s = SslStream::new(ssl, stream)?;
        Pin::new(&mut s)
            .connect()
            .await
            .map_err(|e| TlsError::Handshake(describe_ssl_error(&e)))?;
        Ok(s)
    }
}

/// A rustls server (TLS 1.2/1.3, AEAD suites) for the legs we control: the cloud simulator's
/// modern mode and, later, the new-path backend.
#[derive(Clone)]
pub struct ModernServer {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl ModernServer {
    /// Serves the RSA leaf from `paths`.
    pub fn new(paths: &CertPaths) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.rsa_cert)
            .map_err(|_| TlsError::Pem(paths.rsa_cert.clone()))?
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::Pem(paths.rsa_cert.clone()))?;
        let key = PrivateKeyDer::from_pem_file(&paths.rsa_key)
            .map_err(|_| TlsError::Pem(paths.rsa_key.clone()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    /// Runs the server handshake.
    pub async fn accept<S>(&self, stream: S) -> Result<tokio_rustls::server::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor
            .accept(stream)
            .await
            .map_err(|e| TlsError::Handshake(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn init_writes_private_keys_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = init_certs(dir.path(), false).unwrap();
        for key in [&p.ca_key, &p.rsa_key, &p.ecdsa_key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(matches!(
            init_certs(dir.path(), false),
            Err(TlsError::Exists(_))
        ));
        let before = std::fs::read(&p.rsa_cert).unwrap();
        init_certs(dir.path(), true).unwrap();
        assert_ne!(std::fs::read(&p.rsa_cert).unwrap(), before);
        let (_, created) = ensure_certs(dir.path()).unwrap();
        assert!(!created);
    }

    #[test]
    fn leaf_covers_the_cloud_names_and_is_backdated() {
        let dir = tempfile::tempdir().unwrap();
        let p = init_certs(dir.path(), false).unwrap();
        let chain = X509::stack_from_pem(&std::fs::read(&p.rsa_cert).unwrap()).unwrap();
        assert_eq!(chain.len(), 2);
        let leaf = &chain[0];
        let names: Vec<String> = leaf
            .subject_alt_names()
            .unwrap()
            .iter()
            .filter_map(|n| n.dnsname().map(str::to_owned))
            .collect();
        for n in LEAF_NAMES {
            assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
        }
        let pk = leaf.public_key().unwrap();
        assert_eq!(pk.rsa().unwrap().size() * 8, 2048);
        assert!(leaf.not_before() < openssl::asn1::Asn1Time::from_unix(86_400).unwrap());
        assert!(leaf.not_after() > openssl::asn1::Asn1Time::from_unix(4_000_000_000).unwrap());
        let ca = X509::from_pem(&std::fs::read(&p.ca_cert).unwrap()).unwrap();
        assert!(leaf.verify(&ca.public_key().unwrap()).unwrap());
        let ec = X509::stack_from_pem(&std::fs::read(&p.ecdsa_cert).unwrap()).unwrap();
        assert!(ec[0].public_key().unwrap().ec_key().is_ok());
    }
}
