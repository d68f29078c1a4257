//! The TLS client policy of Flux's clients: the `flux` CLI (blocking, through ureq and
//! tungstenite) and `flux-loadtest` (async, through tokio-rustls) reach an `https://`
//! deployment — Flux serves plain HTTP, behind a TLS terminator — with the same checks.
//!
//! The server's certificate is checked against the system's roots plus any `--ca-cert` PEM
//! file (a private CA, a self-signed certificate), or is one of that file's certificates
//! exactly (`ChainOrPinned`); there is no way to skip the check. rustls runs on the `ring`
//! provider the workspace already builds for the NATS client; [`rustls`] is re-exported so
//! callers build sessions with the very version the configuration is made for. A handshake
//! refused over the certificate is told the same way by both ([`explain_refusal`]).
//!
//! Invariants: a certificate, chained or pinned, is always checked against the
//! [`server_name`] of the URL's host (a name or an IP address); handshake signatures are always
//! checked.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

pub use rustls;

/// A client configuration trusting the system's roots and the certificates in `ca_cert`.
pub fn client_config(ca_cert: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    // The system's store; certificates it cannot parse are skipped, as browsers do.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    let mut pinned = Vec::new();
    if let Some(path) = ca_cert {
        let certs = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading --ca-cert {}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing --ca-cert {}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("--ca-cert {} holds no PEM certificate", path.display());
        }
        for cert in certs {
            roots
                .add(cert.clone())
                .with_context(|| format!("--ca-cert {}", path.display()))?;
            pinned.push(cert);
        }
    }
    if roots.is_empty() {
        anyhow::bail!("no trusted certificate: the system has none, give --ca-cert");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chains = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("TLS certificate verifier")?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOrPinned { chains, pinned }))
        .with_no_client_auth())
}

/// A handshake refused over the server's certificate, in words a user can act on: why (the
/// rustls reason in parentheses) and what `--ca-cert` takes. `host` is the URL's host. `None`
/// for a TLS error that is not about the certificate.
pub fn explain_refusal(error: &rustls::Error, host: &str) -> Option<String> {
    use rustls::CertificateError;
    let rustls::Error::InvalidCertificate(reason) = error else {
        return None;
    };
    let problem = match reason {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "does not name {host}, so the certificate is not trusted for it ({reason}): give \
                 the URL a host the certificate names"
            )
        }
        // webpki's refusal of a CA's certificate as a server's own (the default of `openssl
        // req -x509`) reaches rustls as an opaque error.
        CertificateError::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
            format!("is not trusted ({other}: it is marked as a CA's)")
        }
        _ => format!("is not trusted ({reason})"),
    };
    Some(format!(
        "the server's certificate {problem}; --ca-cert takes a PEM file with the server's \
         certificate or the CA's that issued it"
    ))
}

/// The name certificates are checked against for `host`, a URL's host without its port: a DNS
/// name, an IPv4 address, or an IPv6 address with or without its brackets.
pub fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    Ok(
        ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .with_context(|| format!("{host:?} is not a host name for TLS"))?
            .to_owned(),
    )
}

/// Checks a server's certificate chain against the trusted roots; failing that, accepts a
/// certificate that is byte for byte one of `--ca-cert`'s and names the server. `openssl req
/// -x509` makes self-signed certificates marked as CAs by default, which chain checks refuse to
/// meet as a server's own (`CaUsedAsEndEntity`); a user who handed over that exact certificate
/// trusts it. Handshake signatures are always checked, so the server must hold the
/// certificate's key.
#[derive(Debug)]
struct ChainOrPinned {
    chains: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for ChainOrPinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.chains
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .or_else(|error| {
                if !self
                    .pinned
                    .iter()
                    .any(|cert| cert.as_ref() == end_entity.as_ref())
                {
                    return Err(error);
                }
                // No chain to check, but the certificate must still name the server.
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chains.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_names_or_addresses_without_brackets() {
        for (host, wanted) in [
            ("flux.example", "DnsName"),
            ("127.0.0.1", "IpAddress"),
            ("[::1]", "IpAddress"),
            ("::1", "IpAddress"),
        ] {
            let name = server_name(host).expect(host);
            assert!(format!("{name:?}").starts_with(wanted), "{host}: {name:?}");
        }
        assert!(server_name("not a host").is_err());
    }

    #[test]
    fn a_ca_cert_that_is_missing_or_holds_no_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("flux-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").expect("write");
        let error = client_config(Some(&empty)).expect_err("no certificate");
        assert!(
            format!("{error:#}").contains("holds no PEM certificate"),
            "{error:#}"
        );
        let missing = dir.join("missing.pem");
        let error = client_config(Some(&missing)).expect_err("no file");
        assert!(
            format!("{error:#}").contains("reading --ca-cert"),
            "{error:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
