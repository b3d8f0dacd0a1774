//! The platform a run targets (`--platform os/arch[/variant]`, as `az acr run`), which sets
//! `.Run.OS` and `.Run.Architecture` and is handed to every build and container.

/// `os/architecture[/variant]` in Docker's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

const OSES: &[&str] = &["linux", "windows"];
const ARCHITECTURES: &[&str] = &[
    "amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le",
];

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [os] => (*os, "amd64", None),
            [os, arch] => (*os, *arch, None),
            [os, arch, v] => (*os, *arch, Some(*v)),
            _ => return Err(format!("platform {s:?} is not os/architecture[/variant]")),
        };
        let os = os.to_ascii_lowercase();
        // Docker's aliases for the same architectures.
        let arch = match arch.to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" => "amd64".to_string(),
            "aarch64" => "arm64".to_string(),
            "i386" => "386".to_string(),
            a => a.to_string(),
        };
        if !OSES.contains(&os.as_str()) {
            return Err(format!(
                "platform {s:?}: unknown OS {os:?} (one of {})",
                OSES.join(", ")
            ));
        }
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(format!(
                "platform {s:?}: unknown architecture {arch:?} (one of {})",
                ARCHITECTURES.join(", ")
            ));
        }
        let variant = match variant {
            None | Some("") => None,
            Some(v) if matches!(v, "v5" | "v6" | "v7" | "v8") => Some(v.to_string()),
            Some(v) => {
                return Err(format!(
                    "platform {s:?}: unknown variant {v:?} (one of v5, v6, v7, v8)"
                ))
            }
        };
        Ok(Platform {
            os,
            architecture: arch,
            variant,
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_platform_strings() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()),
            ("linux", "arm", Some("v7"))
        );
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert_eq!(
            "linux".parse::<Platform>().unwrap().to_string(),
            "linux/amd64"
        );
        assert_eq!(
            "Linux/x86_64".parse::<Platform>().unwrap().to_string(),
            "linux/amd64"
        );
        assert_eq!(
            "linux/aarch64".parse::<Platform>().unwrap().to_string(),
            "linux/arm64"
        );
        for bad in [
            "",
            "linux/",
            "darwin/amd64",
            "linux/sparc",
            "linux/arm/v9",
            "a/b/c/d",
        ] {
            let e = bad.parse::<Platform>().unwrap_err();
            assert!(e.contains("platform"), "{bad}: {e}");
        }
    }
}
