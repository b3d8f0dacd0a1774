//! The runner image recipes: `runners/busybox`, built from the host's static busybox, so
//! nothing has to be pulled from outside; and `runners/acr`, the `acr` alias's image, made
//! of this very binary.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{BuildSpec, LogSink, Runtime, RuntimeError};

pub const RUNNER_IMAGE: &str = "acr-task/runner:latest";
/// Tagged too when free, so task files written for ACR (`busybox ...`) run unchanged.
pub const BUSYBOX_IMAGE: &str = "busybox:latest";
pub const RUNNER_LABEL: &str = "io.acr-task.runner";
const DOCKERFILE: &str = include_str!("../../runners/busybox/Dockerfile");
const ACR_DOCKERFILE: &str = include_str!("../../runners/acr/Dockerfile");
/// What the acr image records of the binary it carries, to be rebuilt when it changes.
pub const ACR_BINARY_LABEL: &str = "io.acr-task.acr-binary";

/// Image names that the runner recipe provides.
pub fn is_runner_image(image: &str) -> bool {
    matches!(
        image,
        "busybox" | "busybox:latest" | "acr-task/runner" | "acr-task/runner:latest"
    )
}

/// The static busybox to put in the image: `$ACR_TASK_BUSYBOX`, else the host's.
pub fn busybox_binary() -> Result<PathBuf, RuntimeError> {
    let candidates: Vec<PathBuf> = match std::env::var_os("ACR_TASK_BUSYBOX") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec!["/bin/busybox".into(), "/usr/bin/busybox".into()],
    };
    for c in &candidates {
        if let Ok(bytes) = std::fs::read(c) {
            if is_static_elf(&bytes) {
                return Ok(c.clone());
            }
        }
    }
    Err(RuntimeError::Invalid {
        what: "busybox binary",
        value: candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        reason:
            "no statically linked busybox found; install it with `apt-get install busybox-static`"
                .into(),
    })
}

/// An ELF executable with no program interpreter (PT_INTERP) runs in an empty root.
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        b.get(o..o + 4).map(|t| t != [3, 0, 0, 0]).unwrap_or(false)
    })
}

/// Builds the runner image; tags `busybox:latest` too unless a foreign one exists.
pub async fn build_runner<R: Runtime>(rt: &R, log: &LogSink) -> Result<String, RuntimeError> {
    let busybox = busybox_binary()?;
    let dir = tempfile::tempdir().map_err(|e| RuntimeError::Engine(format!("temp dir: {e}")))?;
    let io = |e: std::io::Error| RuntimeError::Engine(format!("preparing the runner context: {e}"));
    std::fs::copy(&busybox, dir.path().join("busybox")).map_err(io)?;
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE).map_err(io)?;
    let mut tags = vec![RUNNER_IMAGE.to_string()];
    let busybox_free = match rt.image_label(BUSYBOX_IMAGE, RUNNER_LABEL).await? {
        None => true,
        Some(label) => label.is_some(),
    };
    if busybox_free {
        tags.push(BUSYBOX_IMAGE.to_string());
    }
    let spec = BuildSpec {
        context: crate::runtime::BuildContext::Dir(dir.path().to_path_buf()),
        dockerfile: "Dockerfile".into(),
        tags,
        labels: BTreeMap::new(),
        ..Default::default()
    };
    Ok(rt.build(&spec, log).await?.image_id)
}

/// The binary the acr image is made of, and a key naming its build (size and mtime).
pub fn acr_binary() -> Result<(PathBuf, String), RuntimeError> {
    let invalid = |reason: String| RuntimeError::Invalid {
        what: "acr-task binary",
        value: "/proc/self/exe".into(),
        reason,
    };
    let exe = std::env::current_exe().map_err(|e| invalid(e.to_string()))?;
    let meta = std::fs::metadata(&exe).map_err(|e| invalid(e.to_string()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((exe, format!("{}-{mtime}", meta.len())))
}

/// The shared libraries (and the program interpreter) `exe` loads, as `ldd` lists them;
/// empty for a static binary.
fn linked_libraries(exe: &std::path::Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let out = std::process::Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| RuntimeError::Engine(format!("running ldd on {}: {e}", exe.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Builds `acr-task/acr:latest` from this binary, on the busybox runner (present already).
pub async fn build_acr_image<R: Runtime>(rt: &R, log: &LogSink) -> Result<String, RuntimeError> {
    let (exe, key) = acr_binary()?;
    let dir = tempfile::tempdir().map_err(|e| RuntimeError::Engine(format!("temp dir: {e}")))?;
    let io = |e: std::io::Error| RuntimeError::Engine(format!("preparing the acr image: {e}"));
    let root = dir.path().join("rootfs");
    let put = |from: &std::path::Path, to: &std::path::Path| -> Result<(), RuntimeError> {
        let dest = root.join(to.strip_prefix("/").unwrap_or(to));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // `copy` follows links: the file lands under the name the loader looks for.
        std::fs::copy(from, &dest).map_err(io)?;
        Ok(())
    };
    put(&exe, std::path::Path::new("/usr/local/bin/acr-task"))?;
    for lib in linked_libraries(&exe)? {
        put(&lib, &lib)?;
    }
    let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        put(bundle, bundle)?;
    }
    std::fs::write(dir.path().join("Dockerfile"), ACR_DOCKERFILE).map_err(io)?;
    let spec = BuildSpec {
        context: crate::runtime::BuildContext::Dir(dir.path().to_path_buf()),
        dockerfile: "Dockerfile".into(),
        tags: vec![crate::task::alias::ACR_IMAGE.to_string()],
        labels: BTreeMap::from([(ACR_BINARY_LABEL.to_string(), key)]),
        ..Default::default()
    };
    Ok(rt.build(&spec, log).await?.image_id)
}

/// Image names the acr recipe provides.
pub fn is_acr_image(image: &str) -> bool {
    matches!(image, "acr-task/acr" | "acr-task/acr:latest")
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_busybox_is_static() {
        // CI installs busybox-static; a dynamic busybox would give a runner that cannot start.
        let p = super::busybox_binary()
            .expect("busybox-static must be installed (apt-get install busybox-static)");
        assert!(super::is_static_elf(&std::fs::read(p).unwrap()));
        assert!(!super::is_static_elf(&std::fs::read("/bin/sh").unwrap()));
    }

    #[test]
    fn the_binary_s_libraries_are_found() {
        // The acr image needs the loader and libc at least (this test binary links both).
        let exe = std::env::current_exe().unwrap();
        let libs = super::linked_libraries(&exe).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        assert!(libs.iter().all(|l| l.exists()), "{libs:?}");
    }
}
