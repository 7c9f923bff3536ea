//! Server-certificate verification as spice-gtk does it.
//!
//! rustls' stock `WebPkiServerVerifier` ignores the subject CN, spice-gtk
//! (spice-common `ssl_verify.c`) does not: a QEMU certificate with
//! `CN=127.0.0.1` and no subjectAltName is accepted by remote-viewer and
//! would be refused by a stock rustls client. [`SpiceServerVerifier`] keeps
//! webpki for everything that is cryptography (chain to the CA file,
//! validity dates, extendedKeyUsage `serverAuth`, handshake signatures) and
//! then applies spice-gtk's rule for *which* certificate is the right one:
//!
//! - **hostname** (default): subjectAltName `DNS:` entries (ASCII
//!   case-insensitive, `*` matches within one label) and `IP:` entries
//!   (byte compare with the host parsed as an address); the CN is consulted
//!   only if the certificate has no `DNS:` or `IP:` entry at all.
//! - **subject** (`--cert-subject`, spice-gtk's `cert-subject` /
//!   remote-viewer's `--spice-host-subject`): `key=value` pairs separated by
//!   commas (`\,` and `\\` escape) must equal the certificate's subject
//!   entry by entry, in certificate order, compared as OpenSSL's
//!   `X509_NAME_cmp` does (leading/trailing spaces dropped, runs of spaces
//!   folded, ASCII case ignored). When a subject is given the host name is
//!   not checked, as in spice-gtk.
//!
//! Failures come out as [`VerifyError`] (wrapped into a rustls
//! `CertificateError::Other` on the way through the handshake, recovered by
//! [`Session`](super::Session) as
//! [`SessionErrorKind::Verification`](super::SessionErrorKind::Verification)).

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

/// What went wrong when checking the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyErrorKind {
    /// The chain does not lead to a CA of the CA file.
    UnknownIssuer,
    /// The certificate (or one of its chain) has expired.
    Expired,
    /// The certificate (or one of its chain) is not valid yet.
    NotYetValid,
    /// extendedKeyUsage lacks `serverAuth`.
    WrongPurpose,
    /// A signature of the chain does not verify.
    BadSignature,
    /// The certificate does not name the host (spice-gtk's hostname rule).
    HostMismatch,
    /// The subject differs from `--cert-subject`.
    SubjectMismatch,
    /// The certificate cannot be parsed, or another webpki refusal.
    BadCertificate,
}

/// A refused server certificate, with a message that says what to check.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct VerifyError {
    kind: VerifyErrorKind,
    message: String,
}

impl VerifyError {
    fn new(kind: VerifyErrorKind, message: String) -> Self {
        Self { kind, message }
    }

    /// A refusal that did not come from our own checks.
    pub(crate) fn other(message: String) -> Self {
        Self::new(VerifyErrorKind::BadCertificate, message)
    }

    /// Which check failed.
    pub fn kind(&self) -> VerifyErrorKind {
        self.kind
    }

    /// The human-readable explanation (also the `Display` text).
    pub fn message(&self) -> &str {
        &self.message
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }

    /// Recovers a `VerifyError` that went through rustls as a
    /// `CertificateError::Other`.
    pub(crate) fn from_rustls(err: &rustls::Error) -> Option<Self> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<VerifyError>().cloned()
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Distinguished names

/// Attribute names accepted in `--cert-subject`, as OpenSSL's
/// `OBJ_txt2obj` knows them (short and long names, case-sensitive), with
/// the short name used when printing a subject.
const ATTRIBUTES: &[(&str, &str, &str)] = &[
    // (short name, long name, OID)
    ("C", "countryName", "2.5.4.6"),
    ("ST", "stateOrProvinceName", "2.5.4.8"),
    ("L", "localityName", "2.5.4.7"),
    ("O", "organizationName", "2.5.4.10"),
    ("OU", "organizationalUnitName", "2.5.4.11"),
    ("CN", "commonName", "2.5.4.3"),
    ("emailAddress", "emailAddress", "1.2.840.113549.1.9.1"),
    ("DC", "domainComponent", "0.9.2342.19200300.100.1.25"),
    ("UID", "userId", "0.9.2342.19200300.100.1.1"),
    ("serialNumber", "serialNumber", "2.5.4.5"),
    ("SN", "surname", "2.5.4.4"),
    ("GN", "givenName", "2.5.4.42"),
    ("title", "title", "2.5.4.12"),
    ("street", "streetAddress", "2.5.4.9"),
    ("postalCode", "postalCode", "2.5.4.17"),
    ("initials", "initials", "2.5.4.43"),
    ("name", "name", "2.5.4.41"),
    ("dnQualifier", "dnQualifier", "2.5.4.46"),
    ("pseudonym", "pseudonym", "2.5.4.65"),
    ("generationQualifier", "generationQualifier", "2.5.4.44"),
    ("description", "description", "2.5.4.13"),
    ("businessCategory", "businessCategory", "2.5.4.15"),
];

const OID_CN: &str = "2.5.4.3";

fn oid_for_key(key: &str) -> Option<String> {
    if let Some((_, _, oid)) = ATTRIBUTES.iter().find(|(sn, ln, _)| *sn == key || *ln == key) {
        return Some((*oid).to_owned());
    }
    // A dotted OID (OBJ_txt2obj accepts those too): at least two arcs.
    let arcs: Vec<&str> = key.split('.').collect();
    let dotted = arcs.len() >= 2 && arcs.iter().all(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()));
    dotted.then(|| key.to_owned())
}

fn short_name(oid: &str) -> &str {
    ATTRIBUTES.iter().find(|(_, _, o)| *o == oid).map_or(oid, |(sn, _, _)| sn)
}

/// OpenSSL's canonical form of a name value (`asn1_string_canon`): leading
/// and trailing white space dropped, inner runs folded into one space,
/// ASCII letters lower-cased (other characters kept as they are).
fn canonical(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut pending_space = false;
    for ch in value.chars() {
        if is_c_space(ch) {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

/// C's `isspace` in the "C" locale.
fn is_c_space(ch: char) -> bool {
    matches!(ch, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// One attribute of a certificate's name: dotted OID and its value as text
/// (`None` for a value type OpenSSL would not canonicalise either).
#[derive(Debug, Clone, PartialEq, Eq)]
struct NameEntry {
    oid: String,
    value: Option<String>,
}

/// Decodes the string types OpenSSL canonicalises (`ASN1_MASK_CANON`).
fn decode_name_value(tag: u32, data: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, VisibleString
        12 | 19 | 22 | 26 => std::str::from_utf8(data).ok().map(str::to_owned),
        // TeletexString: OpenSSL treats it as one byte per character.
        20 => Some(data.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UCS-2 big-endian.
        30 => {
            if !data.len().is_multiple_of(2) {
                return None;
            }
            let units = data.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().ok()
        }
        // UniversalString: UCS-4 big-endian.
        28 => {
            if !data.len().is_multiple_of(4) {
                return None;
            }
            data.chunks_exact(4).map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))).collect()
        }
        _ => None,
    }
}

/// The name as a list of RDNs, each a list of entries.
fn name_rdns(name: &X509Name<'_>) -> Vec<Vec<NameEntry>> {
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| NameEntry {
                    oid: atv.attr_type().to_id_string(),
                    value: decode_name_value(atv.attr_value().tag().0, atv.attr_value().data),
                })
                .collect()
        })
        .collect()
}

fn escape_value(value: &str, out: &mut String) {
    for ch in value.chars() {
        if ch == ',' || ch == '\\' {
            out.push('\\');
        }
        out.push(ch);
    }
}

/// A name in spice-gtk's `cert-subject` form, certificate order:
/// `C=XX,O=test,CN=127.0.0.1` (`,` and `\` escaped), ready to paste into
/// `--cert-subject`. Entries of a multi-valued RDN are joined with `+`
/// (which `--cert-subject` cannot express).
fn format_rdns(rdns: &[Vec<NameEntry>]) -> String {
    let mut out = String::new();
    for (i, rdn) in rdns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, entry) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            out.push_str(short_name(&entry.oid));
            out.push('=');
            match &entry.value {
                Some(v) => escape_value(v, &mut out),
                None => out.push_str("<binary>"),
            }
        }
    }
    out
}

/// The subject of a DER certificate in `cert-subject` form, or `None` if
/// the certificate does not parse.
pub fn subject_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(format_rdns(&name_rdns(cert.subject())))
}

/// A parsed `--cert-subject` value (spice-gtk's `cert-subject`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSubject {
    text: String,
    /// (dotted OID, canonical value), one RDN each.
    entries: Vec<(String, String)>,
}

/// A `--cert-subject` value that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cert-subject `{text}`: {what}")]
pub struct SubjectParseError {
    text: String,
    what: String,
}

impl CertSubject {
    /// Parses `key=value[,key=value...]` as spice-gtk does: spaces before a
    /// key are skipped, `\,` and `\\` are the only escapes, empty values and
    /// missing `=` are errors, keys are OpenSSL attribute names (`C`, `O`,
    /// `CN`, `commonName`, ... or a dotted OID).
    pub fn parse(text: &str) -> Result<Self, SubjectParseError> {
        let fail = |what: String| SubjectParseError { text: text.to_owned(), what };
        let mut entries = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            // Key: skip leading spaces, read up to an unescaped '='.
            while chars.peek() == Some(&' ') {
                chars.next();
            }
            if chars.peek().is_none() {
                break;
            }
            let mut key = String::new();
            let mut value = String::new();
            let mut in_value = false;
            let mut ended_by_comma = false;
            while let Some(ch) = chars.next() {
                let (ch, escaped) = if ch == '\\' {
                    match chars.next() {
                        Some(e @ ('\\' | ',')) => (e, true),
                        _ => return Err(fail("only `\\,` and `\\\\` may follow `\\`".into())),
                    }
                } else {
                    (ch, false)
                };
                if !in_value {
                    if ch == ',' && !escaped {
                        return Err(fail(format!("`{key}` has no `=value`")));
                    }
                    if ch == '=' && !escaped {
                        in_value = true;
                    } else {
                        key.push(ch);
                    }
                } else if ch == ',' && !escaped {
                    ended_by_comma = true;
                    break;
                } else {
                    value.push(ch);
                }
            }
            if !in_value {
                return Err(fail(format!("`{key}` has no `=value`")));
            }
            if value.is_empty() {
                return Err(fail(format!("`{key}=` has an empty value")));
            }
            let Some(oid) = oid_for_key(&key) else {
                return Err(fail(format!(
                    "unknown attribute `{key}`; use C, ST, L, O, OU, CN, emailAddress, DC, ... \
                     in certificate order, e.g. C=XX,O=example,CN=host"
                )));
            };
            entries.push((oid, canonical(&value)));
            if !ended_by_comma {
                break;
            }
        }
        if entries.is_empty() {
            return Err(fail("no `key=value` entry".into()));
        }
        Ok(Self { text: text.to_owned(), entries })
    }

    /// The text as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a certificate name equals this subject under OpenSSL's
    /// canonical comparison (same number of entries, same order, each RDN a
    /// single entry with the same attribute and canonical value).
    fn matches(&self, rdns: &[Vec<NameEntry>]) -> bool {
        rdns.len() == self.entries.len()
            && rdns.iter().zip(&self.entries).all(|(rdn, (oid, want))| {
                matches!(rdn.as_slice(), [entry] if entry.oid == *oid
                    && entry.value.as_deref().map(canonical).as_deref() == Some(want.as_str()))
            })
    }
}

impl FromStr for CertSubject {
    type Err = SubjectParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CertSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

// ---------------------------------------------------------------------------
// Host names

/// The longest DNS pattern or host compared; longer never match (keeps the
/// wildcard match O(pattern × host) with a small bound).
const MAX_NAME_BYTES: usize = 255;

/// spice-gtk's (gnutls') wildcard compare: ASCII case-insensitive, `*`
/// matches any run of characters, the empty one included, within one label
/// (never a `.`); several `*` allowed. A dynamic-programming match, so a
/// hostile pattern full of `*` costs at most 256 × 256 steps.
fn dns_pattern_matches(pattern: &[u8], host: &[u8]) -> bool {
    if pattern.len() > MAX_NAME_BYTES || host.len() > MAX_NAME_BYTES {
        return false;
    }
    // row[j]: pattern[..i] matches host[..j].
    let mut row = vec![false; host.len() + 1];
    row[0] = true;
    for &p in pattern {
        let mut next = vec![false; host.len() + 1];
        if p == b'*' {
            // '*' matches empty, or extends a match by one non-dot byte.
            next[0] = row[0];
            for j in 1..=host.len() {
                next[j] = row[j] || (next[j - 1] && host[j - 1] != b'.');
            }
        } else {
            for j in 1..=host.len() {
                next[j] = row[j - 1] && p.eq_ignore_ascii_case(&host[j - 1]);
            }
        }
        row = next;
    }
    row[host.len()]
}

/// What a certificate offers for host matching.
#[derive(Debug, Default)]
struct Names {
    /// `DNS:` entries as raw bytes (x509-parser gives invalid UTF-8 as raw).
    dns: Vec<Vec<u8>>,
    /// `IP:` entries as raw octets.
    ips: Vec<Vec<u8>>,
    /// Every CN of the subject.
    cns: Vec<String>,
}

impl Names {
    fn of(cert: &X509Certificate<'_>) -> Self {
        let mut names = Names::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                match gn {
                    GeneralName::DNSName(s) => names.dns.push(s.as_bytes().to_vec()),
                    GeneralName::IPAddress(b) => names.ips.push(b.to_vec()),
                    GeneralName::Invalid(tag, raw) if tag.0 == 2 => names.dns.push(raw.to_vec()),
                    GeneralName::Invalid(tag, raw) if tag.0 == 7 => names.ips.push(raw.to_vec()),
                    _ => {}
                }
            }
        }
        for rdn in name_rdns(cert.subject()) {
            for entry in rdn {
                if let (true, Some(v)) = (entry.oid == OID_CN, entry.value) {
                    names.cns.push(v);
                }
            }
        }
        names
    }

    /// spice-gtk's hostname rule.
    fn matches_host(&self, host: &str) -> bool {
        if self.dns.is_empty() && self.ips.is_empty() {
            return self.cns.iter().any(|cn| dns_pattern_matches(cn.as_bytes(), host.as_bytes()));
        }
        if self.dns.iter().any(|d| dns_pattern_matches(d, host.as_bytes())) {
            return true;
        }
        let octets: Option<Vec<u8>> = host.parse::<IpAddr>().ok().map(|ip| match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        });
        octets.is_some_and(|o| self.ips.contains(&o))
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        if self.dns.is_empty() && self.ips.is_empty() {
            out.push_str("no DNS/IP subjectAltName, so the CN was compared");
            return out;
        }
        out.push_str("SAN: ");
        let mut first = true;
        let mut sep = |out: &mut String| {
            if !first {
                out.push_str(", ");
            }
            first = false;
        };
        for d in &self.dns {
            sep(&mut out);
            let _ = write!(out, "DNS:{}", String::from_utf8_lossy(d));
        }
        for ip in &self.ips {
            sep(&mut out);
            match ip.len() {
                4 => {
                    let a = <[u8; 4]>::try_from(ip.as_slice()).unwrap_or_default();
                    let _ = write!(out, "IP:{}", std::net::Ipv4Addr::from(a));
                }
                16 => {
                    let a = <[u8; 16]>::try_from(ip.as_slice()).unwrap_or_default();
                    let _ = write!(out, "IP:{}", std::net::Ipv6Addr::from(a));
                }
                _ => {
                    let _ = write!(out, "IP:<{} bytes>", ip.len());
                }
            }
        }
        out.push_str("; the CN is not used when a SAN is present");
        out
    }
}

/// Checks a DER certificate against a host with spice-gtk's hostname rule
/// (no chain verification). Exposed for tests and diagnostics.
pub fn check_host(cert_der: &[u8], host: &str) -> Result<(), VerifyError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| {
        VerifyError::new(VerifyErrorKind::BadCertificate, format!("server certificate does not parse: {e}"))
    })?;
    host_rule(&cert, host)
}

fn host_rule(cert: &X509Certificate<'_>, host: &str) -> Result<(), VerifyError> {
    let names = Names::of(cert);
    if names.matches_host(host) {
        return Ok(());
    }
    let subject = format_rdns(&name_rdns(cert.subject()));
    Err(VerifyError::new(
        VerifyErrorKind::HostMismatch,
        format!(
            "certificate for {subject} does not match host {host} ({}); connect by a name or \
             address the certificate lists, or check --ca-file, or pass \
             --cert-subject \"{subject}\" to check the subject instead of the host",
            names.describe()
        ),
    ))
}

fn subject_rule(cert: &X509Certificate<'_>, want: &CertSubject) -> Result<(), VerifyError> {
    let rdns = name_rdns(cert.subject());
    if want.matches(&rdns) {
        return Ok(());
    }
    let subject = format_rdns(&rdns);
    Err(VerifyError::new(
        VerifyErrorKind::SubjectMismatch,
        format!(
            "certificate subject {subject} does not match --cert-subject \"{want}\"; check \
             --cert-subject (entries in certificate order, e.g. \"{subject}\") or --ca-file"
        ),
    ))
}

// ---------------------------------------------------------------------------
// The verifier

/// rustls `ServerCertVerifier` with spice-gtk's acceptance rule: webpki
/// checks the chain against the CA file, then the host (or, with
/// `--cert-subject`, the subject) is checked as spice-common's
/// `ssl_verify.c` does. Handshake signatures are verified with the
/// provider's algorithms.
#[derive(Debug)]
pub struct SpiceServerVerifier {
    roots: Arc<RootCertStore>,
    /// Where the roots came from, for messages (the CA file's path).
    ca_label: String,
    subject: Option<CertSubject>,
    provider: Arc<CryptoProvider>,
}

impl SpiceServerVerifier {
    /// A verifier trusting `roots` (loaded from `ca_label`), checking the
    /// host or, when given, the subject.
    pub fn new(
        roots: Arc<RootCertStore>,
        ca_label: String,
        subject: Option<CertSubject>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self { roots, ca_label, subject, provider }
    }

    fn chain_error(&self, err: rustls::Error, subject: &str, issuer: &str) -> VerifyError {
        use VerifyErrorKind as K;
        let ca = &self.ca_label;
        let (kind, what) = match err {
            rustls::Error::InvalidCertificate(e) => match e {
                CertificateError::UnknownIssuer => (
                    K::UnknownIssuer,
                    format!(
                        "is issued by {issuer}, which is not a CA of {ca} (nor does the chain \
                         the server sent lead to one); check --ca-file"
                    ),
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    (K::Expired, format!("or its chain has expired ({e:?}); renew the server's certificate"))
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    (K::NotYetValid, format!("or its chain is not valid yet ({e:?}); check the clocks"))
                }
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => (
                    K::WrongPurpose,
                    "lacks extendedKeyUsage serverAuth; reissue it with \
                     extendedKeyUsage=serverAuth"
                        .to_owned(),
                ),
                CertificateError::BadSignature
                | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
                | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                    (K::BadSignature, format!("has a chain signature that does not verify ({e:?}); check --ca-file"))
                }
                other => (K::BadCertificate, format!("was refused ({other:?}); check --ca-file")),
            },
            other => (K::BadCertificate, format!("was refused ({other}); check --ca-file")),
        };
        VerifyError::new(kind, format!("certificate {subject} {what}"))
    }
}

impl ServerCertVerifier for SpiceServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (_, x509) = X509Certificate::from_der(end_entity.as_ref()).map_err(|e| {
            VerifyError::new(
                VerifyErrorKind::BadCertificate,
                format!("the server's certificate does not parse ({e}); is it a SPICE server?"),
            )
            .into_rustls()
        })?;
        let subject = format_rdns(&name_rdns(x509.subject()));
        let chain_result = ParsedCertificate::try_from(end_entity).and_then(|parsed| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &self.roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )
        });
        if let Err(e) = chain_result {
            let issuer = format_rdns(&name_rdns(x509.issuer()));
            return Err(self.chain_error(e, &subject, &issuer).into_rustls());
        }
        let rule = match &self.subject {
            Some(want) => subject_rule(&x509, want),
            None => host_rule(&x509, &host_text(server_name)),
        };
        rule.map_err(VerifyError::into_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The host string spice-gtk would compare: the DNS name as given, an IP
/// address in its standard text form.
fn host_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(oid: &str, v: &str) -> Vec<NameEntry> {
        vec![NameEntry { oid: oid.to_owned(), value: Some(v.to_owned()) }]
    }

    #[test]
    fn wildcard_rules() {
        assert!(dns_pattern_matches(b"localhost", b"LocalHost"));
        assert!(dns_pattern_matches(b"*.example.com", b"a.example.com"));
        assert!(!dns_pattern_matches(b"*.example.com", b"a.b.example.com"));
        assert!(!dns_pattern_matches(b"*.example.com", b"example.com"));
        assert!(dns_pattern_matches(b"f*o.example.com", b"fo.example.com"));
        assert!(dns_pattern_matches(b"f*o.example.com", b"fxxo.example.com"));
        assert!(dns_pattern_matches(b"*.*.com", b"a.b.com"));
        assert!(!dns_pattern_matches(b"a\0b", b"a"));
        assert!(!dns_pattern_matches(b"", b"a"));
        let stars = [b'*'; 255];
        assert!(dns_pattern_matches(&stars, &[b'a'; 255]));
        assert!(!dns_pattern_matches(&stars, b"a.b"));
    }

    #[test]
    fn canonical_like_openssl() {
        assert_eq!(canonical("  VMCRELAY   test "), "vmcrelay test");
        assert_eq!(canonical("\tA\r\nB"), "a b");
        assert_eq!(canonical("Ünï"), "Ünï");
    }

    #[test]
    fn subject_parse_and_match() {
        let rdns = vec![entry("2.5.4.6", "XX"), entry("2.5.4.10", "vmcrelay test"), entry("2.5.4.3", "127.0.0.1")];
        for ok in [
            "C=XX,O=vmcrelay test,CN=127.0.0.1",
            "C=XX, O=vmcrelay test, CN=127.0.0.1",
            "C=xx,O=VMCRELAY  test,CN=127.0.0.1",
            "countryName=XX,organizationName=vmcrelay test,2.5.4.3=127.0.0.1",
        ] {
            assert!(CertSubject::parse(ok).unwrap().matches(&rdns), "{ok}");
        }
        for bad in ["CN=127.0.0.1,O=vmcrelay test,C=XX", "C=XX,O=vmcrelay test", "C=XX,O=vmcrelay test,CN=127.0.0.2"] {
            assert!(!CertSubject::parse(bad).unwrap().matches(&rdns), "{bad}");
        }
        assert_eq!(CertSubject::parse(r"O=a\,b\\c,CN=x").unwrap().entries[0].1, r"a,b\c");
        // A trailing comma ends the list, as in spice-gtk.
        assert!(CertSubject::parse("C=XX,").is_ok());
        for err in ["", "C", "C=", "C=XX,,O=y", "FOO=bar", r"C=\x", "C =XX"] {
            assert!(CertSubject::parse(err).is_err(), "{err:?}");
        }
    }

    #[test]
    fn format_escapes_and_uses_short_names() {
        let rdns = vec![entry("2.5.4.10", "a,b"), entry("1.2.3.4", "z")];
        assert_eq!(format_rdns(&rdns), r"O=a\,b,1.2.3.4=z");
    }

    #[test]
    fn name_value_decoding() {
        assert_eq!(decode_name_value(30, &[0, b'h', 0, b'i']).as_deref(), Some("hi"));
        assert_eq!(decode_name_value(28, &[0, 0, 0, b'h']).as_deref(), Some("h"));
        assert_eq!(decode_name_value(20, &[0xe9]).as_deref(), Some("é"));
        assert_eq!(decode_name_value(30, &[0]), None);
        assert_eq!(decode_name_value(4, b"x"), None);
    }

    #[test]
    fn host_rule_cn_only_without_san() {
        let names = Names { dns: vec![], ips: vec![], cns: vec!["127.0.0.1".into()] };
        assert!(names.matches_host("127.0.0.1"));
        assert!(!names.matches_host("localhost"));
        let names = Names { dns: vec![b"localhost".to_vec()], ips: vec![], cns: vec!["127.0.0.1".into()] };
        assert!(!names.matches_host("127.0.0.1"));
        assert!(names.matches_host("localhost"));
        let names = Names { dns: vec![], ips: vec![vec![127, 0, 0, 1]], cns: vec!["localhost".into()] };
        assert!(names.matches_host("127.0.0.1"));
        assert!(!names.matches_host("127.0.0.2"));
        assert!(!names.matches_host("localhost"));
    }
}
