//! The gate of a prepared container: a static busybox `sh` (from a per-run volume) that
//! waits for one line on stdin and then becomes the step's own process. It is the
//! container's entrypoint, with the step's real command line as its arguments.
//!
//! Busybox's shell runs its own applets for bare names (`true`, `ls`), so the gate finds
//! the program on the container's `PATH` itself and execs it by path, with the name it was
//! given as `argv[0]`; it unsets what the shell would add to the environment. Anything but
//! the release line (a closed stdin: the run went away) ends it without running anything.

/// Where the gate volume is mounted in a prepared container.
pub const DIR: &str = "/.acr-task-gate";
/// The line that releases a gate.
pub const RELEASE: &[u8] = b"go\n";
/// The gate's exit code when it was never released.
pub const NOT_RELEASED: i64 = 125;

const SCRIPT: &str = r#"IFS= read -r go; [ "$go" = go ] || exit 125
unset SHLVL PWD OLDPWD
p=$1
case $p in
*/*) ;;
*) f=; IFS=:; for d in $PATH; do [ -n "$d" ] || d=.; if [ -f "$d/$p" ] && [ -x "$d/$p" ]; then f=$d/$p; break; fi; done; unset IFS
   [ -n "$f" ] || { echo "exec: \"$p\": executable file not found in \$PATH" >&2; exit 127; }
   p=$f;;
esac
n=$1; shift
exec -a "$n" "$p" "$@""#;

/// The entrypoint of a gated container; its command is [`command_line`].
pub fn entrypoint() -> Vec<String> {
    vec![
        format!("{DIR}/busybox"),
        "sh".into(),
        "-c".into(),
        SCRIPT.into(),
        "acr-task-gate".into(),
    ]
}

/// What the container would run, as Docker decides it: the spec's entrypoint, else the
/// image's; then the spec's arguments, else the image's command unless the spec replaced
/// the entrypoint. `None` when that is nothing (Docker refuses such a container).
pub fn command_line(
    spec_entrypoint: Option<&[String]>,
    spec_args: &[String],
    image_entrypoint: Option<&[String]>,
    image_cmd: Option<&[String]>,
) -> Option<Vec<String>> {
    let mut argv: Vec<String> = spec_entrypoint
        .or(image_entrypoint)
        .unwrap_or_default()
        .to_vec();
    if !spec_args.is_empty() {
        argv.extend_from_slice(spec_args);
    } else if spec_entrypoint.is_none() {
        argv.extend_from_slice(image_cmd.unwrap_or_default());
    }
    (!argv.is_empty()).then_some(argv)
}

/// A tar holding `busybox`, executable by every user, for the gate volume.
pub fn volume_archive(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(busybox.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    b.append_data(&mut h, "busybox", busybox)?;
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_command_line_is_the_one_docker_would_run() {
        let (ep, cmd) = (v(&["/entry"]), v(&["default"]));
        // Arguments follow the image's entrypoint.
        assert_eq!(
            command_line(None, &v(&["x"]), Some(&ep), Some(&cmd)),
            Some(v(&["/entry", "x"]))
        );
        // No arguments: the image's command.
        assert_eq!(
            command_line(None, &[], Some(&ep), Some(&cmd)),
            Some(v(&["/entry", "default"]))
        );
        // A new entrypoint drops the image's command.
        assert_eq!(
            command_line(Some(&v(&["sh"])), &[], Some(&ep), Some(&cmd)),
            Some(v(&["sh"]))
        );
        assert_eq!(command_line(None, &[], None, None), None);
    }

    #[test]
    fn the_gate_runs_the_program_on_path_only_once_released() {
        let Ok(busybox) = crate::runtime::runner::busybox_binary() else {
            panic!("busybox-static must be installed (apt-get install busybox-static)");
        };
        let dir = tempfile::tempdir().unwrap();
        // A program named like a busybox applet: the gate must run this one, not the applet.
        let prog = dir.path().join("true");
        std::fs::write(&prog, "#!/bin/sh\necho \"mine:$0:$1\"\n").unwrap();
        std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let run = |input: &[u8], argv: &[&str]| {
            let mut ep = entrypoint();
            ep[0] = busybox.display().to_string();
            let mut c = std::process::Command::new(&ep[0]);
            c.args(&ep[1..])
                .args(argv)
                .env_clear()
                .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
                .env("A", "1")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = c.spawn().unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
            let out = child.wait_with_output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        };
        let (code, out, _) = run(RELEASE, &["true", "arg"]);
        assert_eq!(code, Some(0));
        assert!(out.starts_with("mine:"), "{out}");
        assert!(out.contains(":arg\n"), "{out}");
        // The environment is the container's, nothing the gate's shell adds.
        let (code, out, _) = run(RELEASE, &["env"]);
        assert_eq!(code, Some(0));
        let mut vars: Vec<&str> = out
            .lines()
            .map(|l| l.split('=').next().unwrap_or(l))
            .collect();
        vars.sort();
        assert_eq!(vars, ["A", "PATH"], "{out}");
        // Never released (stdin closed): nothing runs.
        let (code, out, _) = run(b"", &["true"]);
        assert_eq!((code, out.as_str()), (Some(NOT_RELEASED as i32), ""));
        let (code, _, err) = run(RELEASE, &["no-such-program"]);
        assert_eq!(code, Some(127));
        assert!(err.contains("executable file not found"), "{err}");
    }
}
