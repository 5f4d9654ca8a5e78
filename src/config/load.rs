//! Reading the files a configuration names: the config file itself ([`Config::load`]), then the
//! list and rule files, the TLS certificate and key and the downstream CA file, each one's
//! errors turned into `path:line: key: message` [`ConfigError`]s and all of them reported
//! together.

use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use super::Config;
use super::error::{ConfigError, ConfigErrors};
use super::schema::{DownstreamTls, Lists, Rules};
use crate::downstream::tls::ClientTls;
use crate::policy::{FileError, List, ListSet, RuleSet};
use crate::tls::{ServerTls, TlsFile};

impl Config {
    /// Reads the file at `path`, parses it with [`Config::from_toml`] and reads the list, rule
    /// and certificate files it names ([`Config::load_lists`], [`Config::load_rules`],
    /// [`Config::load_tls`]), reporting the errors of all of them together. An unreadable config file is a single error, `path:
    /// cannot read: <reason>`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: path.to_path_buf(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let mut config = Config::from_toml(&text, path)?;
        // Both kinds of file are read before failing, so one `tarmac check` shows every error.
        let mut errors = Vec::new();
        if let Err(ConfigErrors(mut bad)) = config.load_lists() {
            errors.append(&mut bad);
        }
        if let Err(ConfigErrors(mut bad)) = config.load_rules() {
            errors.append(&mut bad);
        }
        if let Err(ConfigErrors(mut bad)) = config.load_tls_ca() {
            errors.append(&mut bad);
        }
        if let Err(ConfigErrors(mut bad)) = config.load_tls() {
            errors.append(&mut bad);
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(config)
    }

    /// Reads `[tls] cert` and `key` into `tls.loaded`, or clears it when no pair is set. An
    /// unreadable file, a file without its PEM item, broken PEM, a certificate that does not
    /// parse or a key that is not the certificate's is one error, `config:line: tls.cert: file:
    /// message` (or `tls.key`), on the line of the key naming the file at fault.
    pub fn load_tls(&mut self) -> Result<(), ConfigErrors> {
        let (Some(cert), Some(key)) = (&self.tls.cert, &self.tls.key) else {
            self.tls.loaded = None;
            return Ok(());
        };
        match ServerTls::load(cert, key) {
            Ok(loaded) => {
                self.tls.loaded = Some(loaded);
                Ok(())
            }
            Err(error) => {
                let [cert_line, key_line] = self.tls.lines;
                let line = match error.file() {
                    TlsFile::Cert => cert_line,
                    TlsFile::Key => key_line,
                };
                Err(ConfigErrors(vec![ConfigError {
                    // A config built in code has no file; the key still says what is wrong.
                    path: self.path.clone().unwrap_or_else(|| PathBuf::from("[tls]")),
                    line,
                    key: error.file().key().to_owned(),
                    message: error.to_string(),
                }]))
            }
        }
    }

    /// Reads the `[lists]` files into `lists.entries`, collecting every bad line as
    /// `file:line: message`. A missing file is an error, except the default
    /// `blocklists/allow.txt` and `blocklists/deny.txt` beside the config: an empty config stays
    /// valid where nobody created them.
    pub fn load_lists(&mut self) -> Result<(), ConfigErrors> {
        let defaults = Lists::default();
        let base = self.path.as_deref().and_then(Path::parent);
        let is_default = |file: &Path, defaults: &[PathBuf]| {
            defaults
                .iter()
                .any(|d| base.map_or(d.clone(), |b| b.join(d)) == file)
        };
        let mut errors = Vec::new();
        let mut read = |files: &[PathBuf], defaults: &[PathBuf]| {
            let mut texts = Vec::with_capacity(files.len());
            for file in files {
                match std::fs::read_to_string(file) {
                    Ok(text) => texts.push((file.clone(), text)),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && is_default(file, defaults) => {}
                    Err(e) => errors.push(ConfigError {
                        path: file.clone(),
                        line: None,
                        key: String::new(),
                        message: format!("cannot read list file: {e}"),
                    }),
                }
            }
            texts
        };
        let allow = read(&self.lists.allow, &defaults.allow);
        let deny = read(&self.lists.deny, &defaults.deny);
        let mut parse = |texts: &[(PathBuf, String)]| {
            List::parse(texts).unwrap_or_else(|bad| {
                errors.extend(bad.into_iter().map(ConfigError::from));
                List::default()
            })
        };
        let entries = ListSet {
            allow: parse(&allow),
            deny: parse(&deny),
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        self.lists.entries = entries;
        Ok(())
    }

    /// Reads `[downstream] tls_ca` into `downstream.tls_ca_certs`: every `CERTIFICATE` block
    /// of the PEM file, each checked to be usable as a trust anchor, so a garbled file fails
    /// `tarmac check` (and a reload) rather than every downstream handshake. Errors read
    /// `file: downstream.tls_ca: message`. Read even while `tls_verify` is off, so turning it
    /// on later meets no surprise. Then builds `downstream.client_tls` from them, once for the
    /// whole server: at start, by `tarmac check` and on each reload.
    pub fn load_tls_ca(&mut self) -> Result<(), ConfigErrors> {
        self.read_tls_ca()?;
        self.downstream.client_tls = match self.downstream.tls {
            DownstreamTls::None => None,
            _ => {
                let built = crate::downstream::tls::client_config(
                    self.downstream.tls_verify,
                    &self.downstream.tls_ca_certs,
                );
                // The certificates were checked as trust anchors just now, so this fails only
                // if rustls refuses its own defaults; name the key all the same.
                let config = built.map_err(|e| {
                    ConfigErrors(vec![ConfigError {
                        path: self.path.clone().unwrap_or_default(),
                        line: None,
                        key: "downstream.tls".to_owned(),
                        message: format!("cannot set up TLS towards the downstream: {e}"),
                    }])
                })?;
                Some(ClientTls::new(config))
            }
        };
        Ok(())
    }

    /// The `tls_ca` half of [`Config::load_tls_ca`]: the file's certificates, checked.
    fn read_tls_ca(&mut self) -> Result<(), ConfigErrors> {
        let Some(file) = &self.downstream.tls_ca else {
            self.downstream.tls_ca_certs = Vec::new();
            return Ok(());
        };
        let error = |message: String| {
            ConfigErrors(vec![ConfigError {
                path: file.clone(),
                line: None,
                key: "downstream.tls_ca".to_owned(),
                message,
            }])
        };
        let pem = std::fs::read(file).map_err(|e| error(format!("cannot read CA file: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(error(
                "no certificate in it; expected PEM \"-----BEGIN CERTIFICATE-----\" blocks"
                    .to_owned(),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            if let Err(e) = roots.add(cert.clone()) {
                return Err(error(format!(
                    "certificate {} of {} is not usable as a CA: {e}",
                    i + 1,
                    certs.len()
                )));
            }
        }
        self.downstream.tls_ca_certs = certs;
        Ok(())
    }

    /// Reads the `[rules]` files into `rules.set`, collecting every error of every file as
    /// `file:line: key: message`. A missing file is an error, except the default
    /// `rules/default.toml` beside the config: an empty config stays valid where nobody
    /// installed the shipped rules.
    pub fn load_rules(&mut self) -> Result<(), ConfigErrors> {
        let base = self.path.as_deref().and_then(Path::parent);
        let is_default = |file: &Path| {
            Rules::default()
                .files
                .iter()
                .any(|d| base.map_or(d.clone(), |b| b.join(d)) == file)
        };
        let mut errors = Vec::new();
        let mut texts = Vec::with_capacity(self.rules.files.len());
        for file in &self.rules.files {
            match std::fs::read_to_string(file) {
                Ok(text) => texts.push((file.clone(), text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && is_default(file) => {}
                Err(e) => errors.push(ConfigError {
                    path: file.clone(),
                    line: None,
                    key: String::new(),
                    message: format!("cannot read rule file: {e}"),
                }),
            }
        }
        match RuleSet::parse(&texts) {
            Ok(set) if errors.is_empty() => {
                self.rules.set = set;
                Ok(())
            }
            Ok(_) => Err(ConfigErrors(errors)),
            Err(bad) => {
                errors.extend(bad.into_iter().map(ConfigError::from));
                Err(ConfigErrors(errors))
            }
        }
    }
}

impl From<FileError> for ConfigError {
    /// A list or rule file's error, as one of the config's.
    fn from(e: FileError) -> ConfigError {
        ConfigError {
            path: e.path,
            line: Some(e.line),
            key: e.key,
            message: e.message,
        }
    }
}
