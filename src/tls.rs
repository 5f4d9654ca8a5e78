//! Inbound TLS (DESIGN.md §1.4, `[tls]`): the certificate chain and private key an operator
//! gives, read from PEM and checked against each other, and the rustls `ServerConfig` built from
//! them that every STARTTLS handshake uses.
//!
//! [`ServerTls::load`] reads the two files; [`ServerTls::from_pem`] takes their contents (no I/O,
//! for tests and fuzzing). Errors name the file and which of `tls.cert` / `tls.key` it belongs
//! to, so [`Config::load`](crate::config::Config::load) reports them as `file:line: key:
//! message` like every other config error, and a SIGHUP with a bad pair is refused as a whole
//! while the pair in force stays.
//!
//! TLS 1.3 and 1.2 are on (many MTAs still speak only 1.2), with rustls' defaults for cipher
//! suites and key exchange, the `ring` provider, no client certificates and no ALPN. Nothing
//! here does socket I/O: the server's connection driver runs the handshakes
//! (`server::tls_stream`). The client side towards the downstream lives in `downstream`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

/// A loaded certificate chain and key, ready for handshakes. Cheap to clone (an `Arc`); a
/// reload builds a new one, so handshakes already under way finish with the pair they began
/// with.
#[derive(Clone)]
pub struct ServerTls(Arc<ServerConfig>);

/// Which of the two `[tls]` files an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    /// `cert`: the PEM certificate chain, leaf first.
    Cert,
    /// `key`: the PEM private key of the leaf.
    Key,
}

/// Why a certificate chain and key cannot serve STARTTLS. Displayed as `path: what is wrong`.
#[derive(Debug)]
pub enum TlsError {
    /// The file could not be read.
    Read {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
        /// The reason.
        error: io::Error,
    },
    /// The file holds no PEM item of the kind wanted (no `CERTIFICATE`, no `PRIVATE KEY`).
    Missing {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
    },
    /// The PEM text itself is broken (a section without its end line, bad base64).
    Pem {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
        /// What the PEM parser said.
        error: pem::Error,
    },
    /// rustls refused the contents: a certificate that does not parse, a key type it does not
    /// support, or a key that is not the leaf certificate's.
    Refused {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
        /// The certificate file, named when the key does not match it.
        cert: PathBuf,
        /// What rustls said.
        error: rustls::Error,
    },
}

impl ServerTls {
    /// Reads the PEM chain at `cert` and the PEM key at `key` and builds the server
    /// configuration from them.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let read = |file, path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::Read {
                file,
                path: path.to_path_buf(),
                error,
            })
        };
        let cert_pem = read(TlsFile::Cert, cert)?;
        let key_pem = read(TlsFile::Key, key)?;
        ServerTls::from_pem(&cert_pem, cert, &key_pem, key)
    }

    /// Builds the server configuration from the contents of the two files; the paths only name
    /// them in errors. The chain must hold at least one certificate (the leaf first, then its
    /// intermediates); the key file's first private key (PKCS#8, PKCS#1 or SEC1) must be the
    /// leaf's.
    pub fn from_pem(
        cert_pem: &[u8],
        cert: &Path,
        key_pem: &[u8],
        key: &Path,
    ) -> Result<ServerTls, TlsError> {
        let pem_error = |file, path: &Path, error| match error {
            pem::Error::NoItemsFound => TlsError::Missing {
                file,
                path: path.to_path_buf(),
            },
            error => TlsError::Pem {
                file,
                path: path.to_path_buf(),
                error,
            },
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(TlsFile::Cert, cert, e))?;
        if chain.is_empty() {
            return Err(pem_error(TlsFile::Cert, cert, pem::Error::NoItemsFound));
        }
        let private_key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_error(TlsFile::Key, key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let refused = |file, path: &Path, error| TlsError::Refused {
            file,
            path: path.to_path_buf(),
            cert: cert.to_path_buf(),
            error,
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| refused(TlsFile::Cert, cert, e))?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(|e| {
                // A bad certificate is the chain's fault; the rest (unsupported or
                // mismatched key) the key's.
                let file = match e {
                    rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented => TlsFile::Cert,
                    _ => TlsFile::Key,
                };
                let path = if file == TlsFile::Cert { cert } else { key };
                refused(file, path, e)
            })?;
        Ok(ServerTls(Arc::new(config)))
    }

    /// A fresh server-side connection for one STARTTLS handshake.
    pub fn start(&self) -> Result<ServerConnection, rustls::Error> {
        ServerConnection::new(Arc::clone(&self.0))
    }
}

impl PartialEq for ServerTls {
    /// The same load, not the same contents: two loads of one pair are different values (each
    /// has its own session cache), and `Config` only needs equality for its own tests.
    fn eq(&self, other: &ServerTls) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ServerTls {}

impl fmt::Debug for ServerTls {
    /// The rustls config's own `Debug` lists every provider detail; which pair is loaded is in
    /// the `[tls]` paths next to it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerTls(..)")
    }
}

impl TlsFile {
    /// The config key of this file: `tls.cert` or `tls.key`.
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Cert => "tls.cert",
            TlsFile::Key => "tls.key",
        }
    }
}

impl TlsError {
    /// Which file the error is about, so it can be reported on that key's line.
    pub fn file(&self) -> TlsFile {
        match self {
            TlsError::Read { file, .. }
            | TlsError::Missing { file, .. }
            | TlsError::Pem { file, .. }
            | TlsError::Refused { file, .. } => *file,
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, error, .. } => {
                write!(f, "{}: cannot read: {error}", path.display())
            }
            TlsError::Missing {
                file: TlsFile::Cert,
                path,
            } => write!(
                f,
                "{}: no certificate found; expected a PEM \"BEGIN CERTIFICATE\" section",
                path.display()
            ),
            TlsError::Missing {
                file: TlsFile::Key,
                path,
            } => write!(
                f,
                "{}: no private key found; expected a PEM \"BEGIN PRIVATE KEY\" (or RSA/EC) section",
                path.display()
            ),
            TlsError::Pem { path, error, .. } => {
                let what = match error {
                    pem::Error::MissingSectionEnd { .. } => {
                        "a PEM section has no END line".to_owned()
                    }
                    pem::Error::IllegalSectionStart { .. } => {
                        "a PEM BEGIN line is malformed".to_owned()
                    }
                    pem::Error::Base64Decode(e) => format!("bad base64 in a PEM section: {e}"),
                    pem::Error::SectionTooLarge => "a PEM section is too large".to_owned(),
                    other => other.to_string(),
                };
                write!(f, "{}: {what}", path.display())
            }
            TlsError::Refused {
                path, cert, error, ..
            } => match error {
                rustls::Error::InconsistentKeys(_) => write!(
                    f,
                    "{}: does not match the certificate in {}",
                    path.display(),
                    cert.display()
                ),
                error => write!(f, "{}: {error}", path.display()),
            },
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { error, .. } => Some(error),
            TlsError::Pem { error, .. } => Some(error),
            TlsError::Refused { error, .. } => Some(error),
            TlsError::Missing { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn load(cert: &str, key: &str) -> Result<ServerTls, TlsError> {
        ServerTls::from_pem(
            cert.as_bytes(),
            Path::new("/tls/chain.pem"),
            key.as_bytes(),
            Path::new("/tls/key.pem"),
        )
    }

    #[test]
    fn a_matching_pair_loads_and_starts_handshakes() {
        let (cert, key) = pair("mx.test");
        let tls = load(&cert, &key).unwrap();
        assert!(tls.start().unwrap().is_handshaking());
        assert_eq!(tls, tls.clone());
        assert_ne!(
            tls,
            load(&cert, &key).unwrap(),
            "another load is another value"
        );
    }

    #[test]
    fn errors_name_the_file_and_say_what_is_wrong() {
        let (cert, key) = pair("mx.test");
        let (_, other_key) = pair("other.test");
        let cases: [(&str, &str, TlsFile, &str); 6] = [
            (
                "",
                &key,
                TlsFile::Cert,
                "/tls/chain.pem: no certificate found; expected a PEM \"BEGIN CERTIFICATE\" section",
            ),
            (
                &key,
                &key,
                TlsFile::Cert,
                "/tls/chain.pem: no certificate found; expected a PEM \"BEGIN CERTIFICATE\" section",
            ),
            (
                &cert,
                &cert,
                TlsFile::Key,
                "/tls/key.pem: no private key found; expected a PEM \"BEGIN PRIVATE KEY\" (or RSA/EC) section",
            ),
            (
                &cert,
                &other_key,
                TlsFile::Key,
                "/tls/key.pem: does not match the certificate in /tls/chain.pem",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nMIIB\n",
                &key,
                TlsFile::Cert,
                "/tls/chain.pem: a PEM section has no END line",
            ),
            (
                "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
                &key,
                TlsFile::Cert,
                "/tls/chain.pem: invalid peer certificate: BadEncoding",
            ),
        ];
        for (cert, key, file, message) in cases {
            let error = load(cert, key).unwrap_err();
            assert_eq!((error.file(), error.to_string().as_str()), (file, message));
        }
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let error = ServerTls::load(
            Path::new("/nonexistent/chain.pem"),
            Path::new("/nonexistent/key.pem"),
        )
        .unwrap_err();
        assert_eq!(error.file(), TlsFile::Cert);
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/chain.pem: cannot read: "),
            "{error}"
        );
    }
}
