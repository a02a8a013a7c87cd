//! `mesh certs dev DIR`: a development CA and certificates for the coordinator, nodes and a
//! client, so that a local mesh can run with mutual TLS (docs/security.md). Not for
//! production: the CA's key sits next to what it signed.

use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Writes `ca.pem`, `ca.key`, `coordinator.pem/.key` (for `hosts`), one `NODE.pem/.key` per
/// node (for its name) and `client.pem/.key` into `dir`; keys are readable by their owner only.
pub fn dev(dir: &Path, hosts: &[String], nodes: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "agentmesh development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, "ca.pem", &ca_cert.pem(), false)?;
    write(dir, "ca.key", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |file: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| -> Result<()> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.clone())
            .with_context(|| format!("{file}: a name is not valid in a certificate: {names:?}"))?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer)?;
        write(dir, &format!("{file}.pem"), &cert.pem(), false)?;
        write(dir, &format!("{file}.key"), &key.serialize_pem(), true)
    };
    leaf(
        "coordinator",
        hosts.to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    for node in nodes {
        leaf(
            node,
            vec![node.clone()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
    }
    leaf(
        "client",
        vec!["client".to_owned()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    eprintln!(
        "wrote ca.pem, coordinator.pem ({}), {} and client.pem with their keys in {}",
        hosts.join(", "),
        nodes
            .iter()
            .map(|n| format!("{n}.pem"))
            .collect::<Vec<_>>()
            .join(", "),
        dir.display()
    );
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}
