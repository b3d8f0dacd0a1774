//! `acr-task sign`, `verify` and `generate-key-pair`: cosign-format image signatures
//! (see `crate::signature`), on any registry the distribution API reaches.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use super::registry::{print_json, print_rows};
use super::Output;
use crate::registry::client::{RegistryClient, Transport};
use crate::registry::reference::ImageRef;
use crate::signature::{PublicKey, SigningKey};

/// Where a key comes from, as cosign takes it: a file, or `env://VAR`.
#[derive(Debug, Clone)]
pub struct KeyRef(String);

impl std::str::FromStr for KeyRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("give a key file or env://VAR".into());
        }
        Ok(KeyRef(s.to_string()))
    }
}

impl KeyRef {
    /// The key's PEM text and what to call it in errors (never the key itself).
    pub fn read(&self) -> anyhow::Result<(String, Vec<u8>)> {
        match self.0.strip_prefix("env://") {
            Some(var) => {
                let v = std::env::var(var)
                    .with_context(|| format!("env://{var}: the variable is not set"))?;
                Ok((format!("env://{var}"), v.into_bytes()))
            }
            None => Ok((
                self.0.clone(),
                std::fs::read(&self.0).with_context(|| format!("reading {}", self.0))?,
            )),
        }
    }

    pub fn signing_key(&self) -> anyhow::Result<SigningKey> {
        let (what, text) = self.read()?;
        Ok(SigningKey::from_pem(&what, &text)?)
    }

    pub fn public_key(&self) -> anyhow::Result<PublicKey> {
        let (what, text) = self.read()?;
        Ok(PublicKey::from_pem(&what, &text)?)
    }
}

/// The registry login of `sign` and `verify`.
#[derive(Debug, Args)]
pub struct Login {
    /// The registry's user name (default: `docker login`'s credentials for it).
    #[arg(long, short = 'u')]
    username: Option<String>,
    /// The registry's password or token (or ACR_TASK_REGISTRY_PASSWORD).
    #[arg(
        long,
        short = 'p',
        env = "ACR_TASK_REGISTRY_PASSWORD",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    password: Option<String>,
}

fn client(image: &str, login: &Login) -> anyhow::Result<(RegistryClient, ImageRef)> {
    let r = ImageRef::parse(image)
        .with_context(|| format!("{image:?} is not an image reference (HOST/REPO:TAG)"))?;
    let host = r.api_host().to_string();
    let creds = match (&login.username, &login.password) {
        (Some(u), Some(p)) => crate::credentials::Credentials::single(
            &host,
            crate::credentials::Credential {
                username: u.clone(),
                password: p.clone(),
            },
        ),
        (None, None) => crate::credentials::Credentials::from_docker_config()
            .context("reading docker login's credentials")?,
        _ => bail!("--username and --password go together"),
    };
    Ok((RegistryClient::new(host, Transport::new(&[], creds)?), r))
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  acr-task generate-key-pair
  acr-task sign 127.0.0.1:5000/app:v1 --key cosign.key
  acr-task sign 127.0.0.1:5000/app@sha256:... --key env://SIGNING_KEY
The manifest's digest is signed (a tag is resolved first), in cosign's key-pair format; the
signature is stored as an OCI 1.1 referrer of the image and under cosign's tag
sha256-HEX.sig, so cosign, skopeo and podman find it too.")]
pub struct SignArgs {
    /// The image: HOST[:PORT]/REPO:TAG or HOST[:PORT]/REPO@DIGEST.
    pub image: String,
    /// The private key: a PEM file (PKCS#8 or EC), or env://VAR holding one.
    #[arg(long)]
    pub key: KeyRef,
    #[command(flatten)]
    login: Login,
    /// Output format: table or json.
    #[arg(long, short = 'o', value_parser = super::table_or_json, default_value = "table")]
    output: Output,
}

pub fn sign(a: SignArgs) -> anyhow::Result<ExitCode> {
    let key = a.key.signing_key()?;
    let (client, image) = client(&a.image, &a.login)?;
    let signed = super::tokio_runtime()?
        .block_on(crate::registry::signing::sign(&client, &image, &key))
        .with_context(|| format!("signing {}", a.image))?;
    if a.output == Output::Json {
        print_json(&signed)?;
    } else {
        println!(
            "Signed {} ({}) with key {}: referrer {}, tag {}",
            signed.image, signed.digest, signed.key_id, signed.signature, signed.tag
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  acr-task verify 127.0.0.1:5000/app:v1 --key cosign.pub
  acr-task verify 127.0.0.1:5000/app:v1 --key cosign.pub -o json
Exits 0 when at least one signature by the key signs the image's digest, 1 when none does,
listing every signature found and why each that does not count is refused.")]
pub struct VerifyArgs {
    /// The image: HOST[:PORT]/REPO:TAG or HOST[:PORT]/REPO@DIGEST.
    pub image: String,
    /// The public key: a PEM file (cosign.pub), or env://VAR holding one; repeat for
    /// several (any one suffices).
    #[arg(long, required = true)]
    pub key: Vec<KeyRef>,
    #[command(flatten)]
    login: Login,
    /// Output format: table or json.
    #[arg(long, short = 'o', value_parser = super::table_or_json, default_value = "table")]
    output: Output,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let keys = a
        .key
        .iter()
        .map(KeyRef::public_key)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (client, image) = client(&a.image, &a.login)?;
    let v = super::tokio_runtime()?
        .block_on(crate::registry::signing::verify(&client, &image, &keys))
        .with_context(|| format!("verifying {}", a.image))?;
    if a.output == Output::Json {
        print_json(&v)?;
    } else {
        let rows: Vec<Vec<String>> = v
            .signatures
            .iter()
            .map(|s| {
                vec![
                    s.source.clone(),
                    if s.valid { "valid" } else { "refused" }.into(),
                    s.key_id.clone().unwrap_or_default(),
                    s.identity
                        .clone()
                        .or_else(|| s.reason.clone())
                        .unwrap_or_default(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            print_rows(
                Output::Table,
                &["FOUND IN", "SIGNATURE", "KEY", "IDENTITY / WHY"],
                &rows,
            )?;
        }
        let valid = v.signatures.iter().filter(|s| s.valid).count();
        println!(
            "{} {}: {valid} valid signature(s) of {} found",
            if v.verified() {
                "Verified"
            } else {
                "NOT verified"
            },
            v.image,
            v.signatures.len()
        );
    }
    Ok(if v.verified() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Debug, Args)]
#[command(after_help = "Example:
  acr-task generate-key-pair                        # cosign.key and cosign.pub
  acr-task generate-key-pair --output-key-prefix release
The private key is unencrypted PKCS#8 PEM, written with mode 0600: keep it in a secret
store (cosign import-key-pair reads it too); the .pub file is for verify and policies.")]
pub struct GenerateArgs {
    /// Writes PREFIX.key and PREFIX.pub.
    #[arg(long, default_value = "cosign")]
    pub output_key_prefix: PathBuf,
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    let key = SigningKey::generate()?;
    let private = a.output_key_prefix.with_extension("key");
    let public = a.output_key_prefix.with_extension("pub");
    for p in [&private, &public] {
        if p.exists() {
            bail!(
                "{} exists: remove it or give --output-key-prefix",
                p.display()
            );
        }
    }
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    f.write_all(key.to_pem()?.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", private.display()))?;
    std::fs::write(&public, key.public_key().to_pem())
        .with_context(|| format!("writing {}", public.display()))?;
    println!(
        "Private key written to {}\nPublic key written to {} (key id {})",
        private.display(),
        public.display(),
        key.public_key().id()
    );
    Ok(ExitCode::SUCCESS)
}
