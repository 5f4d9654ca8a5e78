//! The client side of STARTTLS towards the downstream: the rustls configuration built from
//! `[downstream] tls_verify` and `tls_ca`, and the name a downstream's certificate is checked
//! against. No I/O: the CA file was read by `Config::load`; the server drives the handshake.
//! Nothing here reads the configuration: its caller passes what `[downstream]` says.
//!
//! With `tls_verify = true` the certificate must chain to the built-in web roots (Mozilla's,
//! from `webpki-roots`, so the result does not depend on the host's trust store) or to a
//! `tls_ca` certificate, and name the server. With `tls_verify = false` any certificate is
//! taken, as MTAs do between each other (Postfix's `smtp_tls_security_level = may`): the
//! connection is encrypted against eavesdropping, not authenticated. The handshake signatures
//! are still checked, so the peer must hold the key of the certificate it shows.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The client configuration built from a loaded `[downstream]`, shared by every downstream
/// connection (and so one session cache for resumption). Equality means "the same build", as
/// for `tls::ServerTls`: `Config` needs it only for its own tests and reload comparisons.
#[derive(Clone)]
pub struct ClientTls(Arc<ClientConfig>);

impl ClientTls {
    /// Wraps a built configuration.
    pub fn new(config: Arc<ClientConfig>) -> ClientTls {
        ClientTls(config)
    }

    /// A client connection to the downstream at `addr`, named as [`server_name`] says.
    pub fn start(&self, addr: SocketAddr) -> Result<rustls::ClientConnection, rustls::Error> {
        rustls::ClientConnection::new(Arc::clone(&self.0), server_name(addr))
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &ClientTls) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ClientTls {}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

/// Builds the client configuration for downstream STARTTLS: `verify` is `[downstream]
/// tls_verify`, `extra_roots` the certificates of its `tls_ca` file (read by `Config::load`),
/// trusted besides the built-in web roots. TLS 1.2 and 1.3 (many MTAs still speak
/// only 1.2), ring as the provider, no client certificate; rustls' in-memory session cache
/// lets repeated connections to the same downstream resume. Build it once per loaded
/// configuration and share it: every connection takes an `Arc`.
///
/// Fails only if a `tls_ca` certificate is not a usable trust anchor, which `Config::load`
/// has already ruled out for a loaded configuration.
pub fn client_config(
    verify: bool,
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let config = if verify {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for cert in extra_roots {
            roots.add(cert.clone())?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The name a downstream's certificate must carry: its IP address, since `[downstream]
/// servers` entries are `ip:port` and there is no host name to go by. A certificate verified
/// with `tls_verify = true` therefore needs an IP `subjectAltName`; no SNI is sent (TLS has
/// none for addresses, RFC 6066 §3).
pub fn server_name(addr: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// `tls_verify = false`: takes any certificate chain, for any name, but checks the handshake
/// signatures with the provider's algorithms, so the session key is really agreed with the
/// holder of the certificate shown.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_is_the_ip_address() {
        assert_eq!(
            server_name("127.0.0.1:10025".parse().unwrap()),
            ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
        );
        assert_eq!(server_name("[::1]:25".parse().unwrap()).to_str(), "::1");
    }

    #[test]
    fn any_certificate_verifies_with_the_providers_algorithms() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = AnyCertificate {
            provider: Arc::clone(&provider),
        };
        let schemes = verifier.supported_verify_schemes();
        assert_eq!(
            schemes,
            provider
                .signature_verification_algorithms
                .supported_schemes()
        );
        assert!(schemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
    }

    #[test]
    fn configs_build_with_and_without_verification() {
        assert!(client_config(false, &[]).is_ok());
        assert!(client_config(true, &[]).is_ok());
        let garbled = [CertificateDer::from(b"not DER".to_vec())];
        assert!(client_config(true, &garbled).is_err());
    }
}
