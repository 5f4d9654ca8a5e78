//! Certificates made by the test itself (rcgen), written as PEM files the way an operator would
//! give them to tarmac and to the sink: a private CA and a leaf it signed for `localhost`,
//! `127.0.0.1` and `::1`. Nothing is read from the system trust store, so `tls_verify` tests can
//! point at [`TestCerts::ca`] and know exactly which chain is trusted.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// PEM files in one directory: the CA certificate, and a leaf chain (leaf then CA) with its key.
pub struct TestCerts {
    /// The CA certificate (PEM), to trust in a client.
    pub ca: PathBuf,
    /// The leaf certificate followed by the CA certificate (PEM), as `[tls] cert` takes it.
    pub chain: PathBuf,
    /// The leaf's private key (PKCS#8 PEM), as `[tls] key` takes it.
    pub key: PathBuf,
}

impl TestCerts {
    /// Makes a fresh CA named `name` and a leaf for loopback, written into `dir` with `name` as the
    /// file prefix, so two pairs in one directory (a reload test) never overwrite each other.
    pub fn generate(dir: &Path, name: &str) -> TestCerts {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("tarmac test CA {name}"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .unwrap();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, format!("localhost ({name})"));
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();

        let certs = TestCerts {
            ca: dir.join(format!("{name}-ca.pem")),
            chain: dir.join(format!("{name}-chain.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&certs.ca, ca.pem()).unwrap();
        std::fs::write(&certs.chain, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        std::fs::write(&certs.key, leaf_key.serialize_pem()).unwrap();
        certs
    }
}

#[cfg(test)]
mod tests {
    use super::TestCerts;

    #[test]
    fn generated_files_are_pem_a_chain_of_two_and_a_key() {
        let dir = crate::temp_dir("certs");
        let certs = TestCerts::generate(&dir, "one");
        let chain = std::fs::read_to_string(&certs.chain).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(
            std::fs::read_to_string(&certs.key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        let other = TestCerts::generate(&dir, "two");
        assert_ne!(chain, std::fs::read_to_string(&other.chain).unwrap());
    }
}
