//! Certificates, keys and the rustls configurations built from them.
//!
//! Server side: QEMU's `x509-dir` layout (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`) or explicit files. As spice-server does, the chain
//! sent to clients is completed from the CA file (leaf, then every CA
//! certificate on its issuer path, root included): spice-gtk with only the
//! root CA refuses a leaf-only chain when an intermediate is involved.
//! [`ServerTls`] holds the current configuration and swaps it on
//! [`ServerTls::reload`]: new sessions get the new one, sessions already
//! made keep the `Arc` of theirs.
//!
//! Client side: a CA file (required: there is no system store), optional
//! client certificate, and [`SpiceServerVerifier`] for spice-gtk's host or
//! `--cert-subject` rule. Like spice-gtk, no SNI and no session
//! resumption.
//!
//! Every error names the file and says what is wrong with it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::Resumption;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::session::{Limits, Session, SessionError};
use super::verify::{CertSubject, SpiceServerVerifier, SubjectParseError};

/// QEMU's file names inside an `x509-dir`.
pub const X509_CA_CERT: &str = "ca-cert.pem";
/// QEMU's server certificate file name.
pub const X509_SERVER_CERT: &str = "server-cert.pem";
/// QEMU's server key file name.
pub const X509_SERVER_KEY: &str = "server-key.pem";

/// A PEM file larger than this is refused before parsing (a certificate
/// chain or key is a few KiB; this catches a wrong path to a big file).
const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

/// A configuration that cannot be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// A file is missing, unreadable or does not hold what it should.
    #[error("{}: {what}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The `--cert-subject` value does not parse.
    #[error(transparent)]
    Subject(#[from] SubjectParseError),
    /// rustls refused the configuration for another reason.
    #[error("TLS configuration: {0}")]
    Other(String),
}

impl ConfigError {
    fn file(path: &Path, what: impl Into<String>) -> Self {
        Self::File { path: path.to_owned(), what: what.into() }
    }

    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::File { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// Where the server's certificate, key and CA come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate(s): the leaf first, optionally its intermediates.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (`RSA PRIVATE KEY`) or SEC1
    /// (`EC PRIVATE KEY`), unencrypted.
    pub key: PathBuf,
    /// PEM CA certificate(s), used to complete the chain. QEMU requires it;
    /// here it is optional for explicit files (the chain is then sent as
    /// the certificate file has it).
    pub ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// QEMU's `x509-dir` layout: `DIR/server-cert.pem`, `DIR/server-key.pem`,
    /// `DIR/ca-cert.pem` (required, as in QEMU).
    pub fn from_x509_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self { cert: dir.join(X509_SERVER_CERT), key: dir.join(X509_SERVER_KEY), ca: Some(dir.join(X509_CA_CERT)) }
    }
}

fn read_pem_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let meta = fs::metadata(path).map_err(|e| ConfigError::file(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(ConfigError::file(path, "not a regular file"));
    }
    if meta.len() > MAX_PEM_FILE_BYTES {
        return Err(ConfigError::file(
            path,
            format!("{} bytes: too large for a PEM certificate or key file", meta.len()),
        ));
    }
    fs::read(path).map_err(|e| ConfigError::file(path, e.to_string()))
}

fn pem_error(path: &Path, e: &pem::Error) -> ConfigError {
    let what = match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            format!("PEM section not terminated (missing `{}`)", String::from_utf8_lossy(end_marker))
        }
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed PEM BEGIN line `{}`", String::from_utf8_lossy(line))
        }
        pem::Error::Base64Decode(m) => format!("PEM body is not valid base64 ({m})"),
        other => format!("{other:?}"),
    };
    ConfigError::file(path, what)
}

/// All PEM sections of a file, in order.
fn pem_sections(path: &Path, bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, ConfigError> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(path, &e))
}

/// Loads every certificate of a PEM file (at least one), each checked to
/// parse as X.509.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = read_pem_file(path)?;
    let sections = pem_sections(path, &bytes)?;
    let mut certs = Vec::new();
    for (kind, der) in sections {
        if kind == SectionKind::Certificate {
            if let Err(e) = X509Certificate::from_der(&der) {
                return Err(ConfigError::file(
                    path,
                    format!("certificate {} is not valid X.509 DER ({e})", certs.len() + 1),
                ));
            }
            certs.push(CertificateDer::from(der));
        }
    }
    if certs.is_empty() {
        let hint = if contains(&bytes, b"PRIVATE KEY-----") { " (this looks like a key file)" } else { "" };
        return Err(ConfigError::file(path, format!("no certificate found (PEM `BEGIN CERTIFICATE` expected){hint}")));
    }
    Ok(certs)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Loads the first private key of a PEM file: PKCS#8, PKCS#1 or SEC1.
/// Encrypted keys are refused with the command that decrypts them.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let bytes = read_pem_file(path)?;
    if contains(&bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || contains(&bytes, b"Proc-Type: 4,ENCRYPTED") {
        return Err(ConfigError::file(
            path,
            "the private key is encrypted, which is not supported; decrypt it with \
             `openssl pkey -in KEY -out KEY.plain` (keep the result mode 0600)",
        ));
    }
    let sections = pem_sections(path, &bytes)?;
    for (kind, der) in sections {
        if let Some(key) = PrivateKeyDer::from_pem(kind, der) {
            return Ok(key);
        }
    }
    let hint = if contains(&bytes, b"BEGIN CERTIFICATE") { " (this looks like a certificate file)" } else { "" };
    Err(ConfigError::file(path, format!("no private key found (PKCS#8, PKCS#1 or SEC1 PEM expected){hint}")))
}

/// Appends to `chain` every certificate of `cas` on the issuer path of its
/// last element, as spice-server does: stops at a self-signed certificate
/// or when no CA certificate has the wanted subject.
fn complete_chain(chain: &mut Vec<CertificateDer<'static>>, cas: &[CertificateDer<'static>]) {
    // Each CA certificate can be appended once, so the loop is bounded.
    for _ in 0..cas.len() {
        let Some(last) = chain.last() else { return };
        let Ok((_, last)) = X509Certificate::from_der(last.as_ref()) else {
            return;
        };
        let issuer = last.issuer().as_raw();
        if issuer == last.subject().as_raw() {
            return;
        }
        let next = cas.iter().find(|ca| {
            !chain.contains(ca)
                && X509Certificate::from_der(ca.as_ref()).is_ok_and(|(_, c)| c.subject().as_raw() == issuer)
        });
        match next {
            Some(ca) => chain.push(ca.clone()),
            None => return,
        }
    }
}

/// Builds the server configuration from files: full chain, TLS 1.3 and
/// 1.2, no client authentication, no tickets and no session cache
/// (spice-gtk never resumes; every channel is a full handshake).
pub fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, ConfigError> {
    let mut chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    if let Some(ca) = &files.ca {
        let cas = load_certs(ca)?;
        complete_chain(&mut chain, &cas);
    }
    let mut config = ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| ConfigError::Other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| key_error(&files.cert, &files.key, e))?;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

fn key_error(cert: &Path, key: &Path, e: rustls::Error) -> ConfigError {
    match e {
        rustls::Error::InconsistentKeys(_) => {
            ConfigError::file(key, format!("this private key does not belong to the certificate in {}", cert.display()))
        }
        other => ConfigError::file(
            key,
            format!(
                "private key not usable ({other}); supported: RSA of 2048 bits or more, ECDSA \
                 P-256/P-384, Ed25519"
            ),
        ),
    }
}

/// The server's TLS configuration, shared by all workers and reloadable:
/// [`reload`](Self::reload) swaps the `Arc` for *new* sessions; a session
/// holds the `Arc` it was made with, so linked channels are untouched.
#[derive(Debug)]
pub struct ServerTls {
    files: ServerTlsFiles,
    limits: Limits,
    current: RwLock<Arc<ServerConfig>>,
    generation: AtomicU64,
}

impl ServerTls {
    /// Loads `files` once; fails with the first problem found.
    pub fn load(files: ServerTlsFiles, limits: Limits) -> Result<Self, ConfigError> {
        let config = Arc::new(server_config(&files)?);
        Ok(Self { files, limits, current: RwLock::new(config), generation: AtomicU64::new(0) })
    }

    /// Reads the files again and, if they load, makes the result the
    /// configuration of sessions created from now on. On failure the
    /// previous configuration stays in force and the error is returned
    /// (for the log line). Returns the new generation number.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let config = Arc::new(server_config(&self.files)?);
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        *current = config;
        Ok(self.generation.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// The configuration new sessions use.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// How many successful reloads happened (0 after [`load`](Self::load)).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The files this holder loads from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// A new server session on the current configuration.
    pub fn session(&self) -> Result<Session, SessionError> {
        Session::server(self.config(), self.limits)
    }
}

/// A client certificate and its key (spice-server never asks for one; a
/// TLS-terminating proxy in front of it might).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// What a client needs to verify a SPICE server as spice-gtk does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// PEM CA file (`--ca-file`, spice-gtk's `ca-file`). Required: unlike
    /// spice-gtk there is no fall-back to a system store.
    pub ca_file: PathBuf,
    /// `--cert-subject` (spice-gtk's `cert-subject`): check the subject
    /// instead of the host.
    pub cert_subject: Option<String>,
    /// Optional client certificate.
    pub client_cert: Option<ClientCertFiles>,
}

impl ClientTlsOptions {
    /// Options with a CA file only (host name check).
    pub fn with_ca_file(ca_file: impl Into<PathBuf>) -> Self {
        Self { ca_file: ca_file.into(), cert_subject: None, client_cert: None }
    }
}

/// Builds the client configuration: roots from the CA file, spice-gtk's
/// verifier, no SNI (spice-gtk sends none), no session resumption.
pub fn client_config(opts: &ClientTlsOptions) -> Result<Arc<ClientConfig>, ConfigError> {
    let provider = super::provider();
    let mut roots = RootCertStore::empty();
    for (i, der) in load_certs(&opts.ca_file)?.into_iter().enumerate() {
        roots.add(der).map_err(|e| {
            ConfigError::file(&opts.ca_file, format!("certificate {} is not usable as a CA ({e})", i + 1))
        })?;
    }
    let subject = opts.cert_subject.as_deref().map(CertSubject::parse).transpose()?;
    let verifier =
        SpiceServerVerifier::new(Arc::new(roots), opts.ca_file.display().to_string(), subject, Arc::clone(&provider));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| ConfigError::Other(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match &opts.client_cert {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = load_certs(&files.cert)?;
            let key = load_key(&files.key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| key_error(&files.cert, &files.key, e))?
        }
    };
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}
