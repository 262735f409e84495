//! `emberctl pki`: an easy certificate path for labs and tests. A private CA
//! (`ca.crt`, `ca.key`) and certificates signed by it, each valid for both
//! server and client authentication, so one certificate serves an agent's
//! API, and (with replication) both ends of a mutual-TLS peer link.
//! Generated with rcgen (ECDSA P-256); no crypto is written here.
//!
//! Production: issue certificates from your own PKI instead and point
//! `[api_tls]` at them; nothing in Ember assumes this CA.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub(crate) enum PkiCmd {
    /// Create a CA in DIR (refuses to overwrite one).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue NAME.crt / NAME.key signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Certificate name (file stem, common name and a SAN DNS name: what
        /// the API's `[api_tls] admins`/`readers` patterns match).
        name: String,
        /// Subject alternative names (DNS names or IP addresses);
        /// default: NAME, localhost, 127.0.0.1, ::1.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Also lay the certificate out for QEMU and libnbd NBD-over-TLS
        /// clients in this directory: `ca-cert.pem`, `client-cert.pem`,
        /// `client-key.pem` (`tls-creds-x509,dir=`, `?tls-certificates=`).
        #[arg(long)]
        client_dir: Option<PathBuf>,
    },
}

fn write_private(path: &Path, body: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(body.as_bytes())?;
    Ok(())
}

pub(crate) fn run(cmd: PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init { dir } => init(&dir),
        PkiCmd::Issue {
            dir,
            name,
            sans,
            client_dir,
        } => {
            issue(&dir, &name, sans)?;
            match client_dir {
                Some(out) => nbd_client_dir(&dir, &name, &out),
                None => Ok(()),
            }
        }
    }
}

/// Creates `ca.crt` and `ca.key` (0600) in `dir`.
pub(crate) fn init(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    if dir.join("ca.key").exists() {
        bail!("{} already holds a CA", dir.display());
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A unique name per CA: verifiers pick issuers by name, so two labs'
    // CAs with one name would fail as "bad signature" instead of "unknown issuer".
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Ember CA {nanos:x}-{}", std::process::id()),
    );
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    write_private(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write_private(&dir.join("ca.crt"), &cert.pem(), 0o644)?;
    println!("created CA in {}", dir.display());
    Ok(())
}

/// Issues `NAME.crt` and `NAME.key` (0600) signed by the CA in `dir`.
pub(crate) fn issue(dir: &Path, name: &str, sans: Vec<String>) -> anyhow::Result<()> {
    ember_common::VolumeName::new(name)
        .map_err(|e| anyhow::anyhow!("certificate name {name:?}: {e}"))?;
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(dir.join("ca.key"))
            .context("reading ca.key (run pki init first)")?,
    )?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).context("reading ca.crt")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let sans = if sans.is_empty() {
        vec![
            name.to_owned(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ]
    } else {
        sans
    };
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    write_private(
        &dir.join(format!("{name}.key")),
        &key.serialize_pem(),
        0o600,
    )?;
    write_private(&dir.join(format!("{name}.crt")), &cert.pem(), 0o644)?;
    println!("issued {name}.crt in {}", dir.display());
    Ok(())
}

/// Copies `NAME`'s certificate, key and the CA into `out` under the names
/// QEMU's `tls-creds-x509` and libnbd's `tls-certificates` look for.
fn nbd_client_dir(dir: &Path, name: &str, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (from, to, mode) in [
        ("ca.crt".to_owned(), "ca-cert.pem", 0o644),
        (format!("{name}.crt"), "client-cert.pem", 0o644),
        (format!("{name}.key"), "client-key.pem", 0o600),
    ] {
        let body =
            std::fs::read_to_string(dir.join(&from)).with_context(|| format!("reading {from}"))?;
        write_private(&out.join(to), &body, mode)?;
    }
    println!("NBD client certificates for {name} in {}", out.display());
    Ok(())
}
