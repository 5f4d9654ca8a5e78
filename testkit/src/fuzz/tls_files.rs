//! The `tls_files` target: a `[tls]` certificate chain and key.

use std::path::Path;

use super::find;

/// Loads a certificate chain and key the way `[tls]` does, with the input split at its first
/// NUL byte into the two files' contents (all of it as both when there is none), and again
/// with the halves joined to the PEM headers, so the parser gets past `BEGIN` lines.
///
/// Properties: no panic; an error names one of the two files, with its path first, on one
/// line; a success only with a `CERTIFICATE` section in the chain and a key in the key file.
pub fn tls_files(data: &[u8]) {
    let (cert, key) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, data),
    };
    tls_pair(cert, key);
    let mut cert_pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    cert_pem.extend_from_slice(cert);
    cert_pem.extend_from_slice(b"\n-----END CERTIFICATE-----\n");
    let mut key_pem = b"-----BEGIN PRIVATE KEY-----\n".to_vec();
    key_pem.extend_from_slice(key);
    key_pem.extend_from_slice(b"\n-----END PRIVATE KEY-----\n");
    tls_pair(&cert_pem, &key_pem);
}

fn tls_pair(cert: &[u8], key: &[u8]) {
    let (cert_path, key_path) = (Path::new("/tls/chain.pem"), Path::new("/tls/key.pem"));
    match tarmac::tls::ServerTls::from_pem(cert, cert_path, key, key_path) {
        Ok(_) => {
            assert!(
                find(cert, b"CERTIFICATE").is_some(),
                "a chain without a certificate"
            );
            assert!(
                find(key, b"PRIVATE KEY").is_some(),
                "a key file without a key"
            );
        }
        Err(error) => {
            let text = error.to_string();
            let path = match error.file() {
                tarmac::tls::TlsFile::Cert => cert_path,
                tarmac::tls::TlsFile::Key => key_path,
            };
            assert!(
                text.starts_with(&format!("{}: ", path.display())),
                "error does not start with its file: {text:?}"
            );
            assert!(!text.contains('\n'), "error on two lines: {text:?}");
        }
    }
}
