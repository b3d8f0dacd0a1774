//! The runner image recipe (`runners/busybox`): built from the host's static busybox, so
//! nothing has to be pulled from outside.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{BuildSpec, LogSink, Runtime, RuntimeError};

pub const RUNNER_IMAGE: &str = "acr-task/runner:latest";
/// Tagged too when free, so task files written for ACR (`busybox ...`) run unchanged.
pub const BUSYBOX_IMAGE: &str = "busybox:latest";
pub const RUNNER_LABEL: &str = "io.acr-task.runner";
const DOCKERFILE: &str = include_str!("../../runners/busybox/Dockerfile");

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
}
