//! Certificates for an etcd that serves TLS and checks client certificates, generated at run
//! time so that no key material is checked in and nothing expires.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// Common name of the client certificate. Deliberately not a user name: with auth enabled,
/// etcd treats the CN of a client certificate as the user when a request carries no token,
/// which would let the certificate alone pass as a user and muddle the auth tests.
pub const CLIENT_CERT_CN: &str = "flannel-test-client";

/// Paths of the PEM files of a TLS-enabled [`EtcdServer`](super::EtcdServer), all inside its
/// temporary directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed both the server and the client certificate (`--etcd-cafile`).
    pub ca: PathBuf,
    /// Server certificate, valid for 127.0.0.1, ::1 and localhost (and any extra addresses
    /// given to [`TlsFiles::generate_for`]).
    pub server_cert: PathBuf,
    /// Server private key (PKCS#8).
    pub server_key: PathBuf,
    /// Client certificate (`--etcd-certfile`).
    pub client_cert: PathBuf,
    /// Client private key, PKCS#8 (`--etcd-keyfile`).
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Generates a CA, a server and a client certificate and writes them as PEM files to `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        Self::generate_for(dir, &[])
    }

    /// Like [`TlsFiles::generate`], with the server certificate also valid for `extra_ips`
    /// (the address of an etcd in a namespace).
    pub fn generate_for(dir: &Path, extra_ips: &[std::net::IpAddr]) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "flannel-rs test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA certificate")?;
        let ca = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut names: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
        names.extend(extra_ips.iter().map(ToString::to_string));
        let mut server_params = CertificateParams::new(names)?;
        server_params.distinguished_name.push(DnType::CommonName, "etcd");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // clientAuth too: etcd 3.4's grpc-gateway (which serves /health and the JSON API)
        // dials etcd's own gRPC port presenting the server certificate as a client one.
        server_params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .context("signing the server certificate")?;

        let client_key = KeyPair::generate().context("generating the client key")?;
        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, CLIENT_CERT_CN);
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &ca)
            .context("signing the client certificate")?;

        let files = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        write(&files.ca, &ca_cert.pem())?;
        write(&files.server_cert, &server_cert.pem())?;
        write(&files.server_key, &server_key.serialize_pem())?;
        write(&files.client_cert, &client_cert.pem())?;
        write(&files.client_key, &client_key.serialize_pem())?;
        Ok(files)
    }

    /// TLS options for etcd-client that trust the CA and present the client certificate.
    pub fn client_tls_options(&self) -> anyhow::Result<etcd_client::TlsOptions> {
        let ca = read(&self.ca)?;
        let identity = etcd_client::Identity::from_pem(read(&self.client_cert)?, read(&self.client_key)?);
        Ok(trusting(ca).identity(identity))
    }

    /// TLS options that trust the CA but present no client certificate, for tests that check
    /// etcd refuses such clients.
    pub fn server_only_tls_options(&self) -> anyhow::Result<etcd_client::TlsOptions> {
        Ok(trusting(read(&self.ca)?))
    }
}

/// TLS options that verify the server against the CA in `ca_pem`.
fn trusting(ca_pem: String) -> etcd_client::TlsOptions {
    etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca_pem))
}

fn write(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
