//! Content digests as the OCI image spec defines them (`algorithm:hex`), for the two
//! registered algorithms: `sha256` (what this registry computes when it names content)
//! and `sha512` (accepted wherever a client names content by it).

use std::io::Read;

use sha2::Digest as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a text is not a digest this registry can verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not `algorithm:encoded` with a lowercase hex encoding of the right length.
    Malformed,
    /// A well-formed digest of an algorithm that is not registered here.
    Unsupported(String),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Malformed => f.write_str(
                "not a digest (ALGORITHM:HEX, e.g. sha256: and 64 lowercase hex digits)",
            ),
            Invalid::Unsupported(a) => write!(f, "digest algorithm {a:?} is not supported"),
        }
    }
}

/// The algorithm of a well-formed digest.
pub fn parse(d: &str) -> Result<Algorithm, Invalid> {
    let Some((alg, hex)) = d.split_once(':') else {
        return Err(Invalid::Malformed);
    };
    let alg = match alg {
        "sha256" => Algorithm::Sha256,
        "sha512" => Algorithm::Sha512,
        // The spec's grammar for other algorithms: [a-z0-9]+([+._-][a-z0-9]+)*.
        other
            if !other.is_empty()
                && other.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || b"+._-".contains(&c)
                }) =>
        {
            return Err(Invalid::Unsupported(other.to_string()))
        }
        _ => return Err(Invalid::Malformed),
    };
    let hex_ok = hex.len() == alg.hex_len()
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    if hex_ok {
        Ok(alg)
    } else {
        Err(Invalid::Malformed)
    }
}

/// A running hash of either algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(alg: Algorithm) -> Hasher {
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// `algorithm:hex`.
    pub fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Hasher::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        }
    }
}

/// The digest of `data` by `alg`.
pub fn of_bytes(alg: Algorithm, data: &[u8]) -> String {
    let mut h = Hasher::new(alg);
    h.update(data);
    h.finish()
}

/// The digest of a file's content by `alg`, and its length.
pub fn of_file(alg: Algorithm, path: &std::path::Path) -> std::io::Result<(String, u64)> {
    of_reader(alg, std::fs::File::open(path)?)
}

/// The digest of everything `r` yields by `alg`, and its length.
pub fn of_reader(alg: Algorithm, mut r: impl Read) -> std::io::Result<(String, u64)> {
    let f = &mut r;
    let mut h = Hasher::new(alg);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finish(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_registered_algorithms_and_nothing_else() {
        // The image spec's own examples.
        let empty256 = of_bytes(Algorithm::Sha256, b"");
        assert_eq!(
            empty256,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let empty512 = of_bytes(Algorithm::Sha512, b"");
        assert!(empty512.starts_with(
            "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
        ));
        assert_eq!(parse(&empty256), Ok(Algorithm::Sha256));
        assert_eq!(parse(&empty512), Ok(Algorithm::Sha512));
        assert_eq!(parse("sha256:abc"), Err(Invalid::Malformed));
        assert_eq!(parse(&empty256.to_uppercase()), Err(Invalid::Malformed));
        assert_eq!(
            parse("blake3:abcd"),
            Err(Invalid::Unsupported("blake3".into()))
        );
        assert_eq!(parse("nonsense"), Err(Invalid::Malformed));
        assert_eq!(parse(":abc"), Err(Invalid::Malformed));
    }
}
