//! Running the delegate plugin, as libcni's `invoke.DelegateAdd`/`DelegateDel` do: found
//! on `CNI_PATH`, config on stdin, the runtime's `CNI_*` environment passed on, the result
//! (or the error object) read from stdout.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use super::args::{CniArgs, Command};
use super::error::{PluginError, CODE_INTERNAL};

/// The first executable file named `plugin` in the colon-separated `cni_path`.
pub fn find_in_path(plugin: &str, cni_path: &str) -> Result<PathBuf, PluginError> {
    let not_found = || PluginError::DelegateNotFound {
        plugin: plugin.to_owned(),
        path: cni_path.to_owned(),
    };
    // A type with a slash would run something outside CNI_PATH.
    if plugin.is_empty() || plugin.contains('/') {
        return Err(not_found());
    }
    cni_path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir).join(plugin))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or_else(not_found)
}

/// Runs the delegate of type `plugin` for `args.command` with `config` on stdin and returns
/// its stdout (empty for DEL and CHECK). A failing delegate's error object becomes
/// [`PluginError::DelegateFailed`], keeping its code.
pub fn run_delegate(
    plugin: &str,
    command: Command,
    args: &CniArgs,
    config: &[u8],
) -> Result<Option<Value>, PluginError> {
    let path = find_in_path(plugin, &args.path)?;
    let failed = |reason: String| PluginError::Delegate {
        command: command.as_str().to_owned(),
        plugin: path.clone(),
        reason,
    };
    // The process environment is inherited (a runtime may pass more than CNI_*); the CNI
    // variables are set explicitly, so the delegate gets the validated ones.
    let mut child = Process::new(&path)
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &args.container_id)
        .env("CNI_NETNS", &args.netns)
        .env("CNI_IFNAME", &args.ifname)
        .env("CNI_ARGS", &args.args)
        .env("CNI_PATH", &args.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| failed(format!("cannot start it: {e}")))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A delegate that exits without reading stdin closes the pipe: its exit status and
    // output then tell what happened, so a write error is not the error to report.
    let _ = stdin.write_all(config);
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("waiting for it: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let error: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        return Err(match error["msg"].as_str() {
            Some(msg) => PluginError::DelegateFailed {
                command: command.as_str().to_owned(),
                plugin: plugin.to_owned(),
                code: error["code"]
                    .as_u64()
                    .and_then(|c| u32::try_from(c).ok())
                    .unwrap_or(CODE_INTERNAL),
                msg: msg.to_owned(),
                details: error["details"].as_str().unwrap_or_default().to_owned(),
            },
            None => failed(format!("it exited with {} and printed {:?}", out.status, stdout.trim())),
        });
    }
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&stdout).map(Some).map_err(|e| {
        failed(format!(
            "it printed something that is not JSON ({e}): {:?}",
            stdout.trim()
        ))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn args(path: &Path) -> CniArgs {
        CniArgs {
            command: Command::Add,
            container_id: "c".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: String::new(),
            path: format!("/nonexistent:{}", path.display()),
        }
    }

    #[test]
    fn finds_executables_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "").unwrap();
        script(dir.path(), "bridge", "true");
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(find_in_path("bridge", &path).unwrap(), dir.path().join("bridge"));
        assert!(find_in_path("plain", &path).is_err());
        assert!(find_in_path("../bridge", &path).is_err());
        let e = find_in_path("portmap", &path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("failed to find plugin \"portmap\" in path {path:?}")
        );
    }

    #[test]
    fn passes_config_and_environment_and_reads_the_result() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "fake",
            r#"read -r conf; printf '{"cniVersion":"1.0.0","seen":%s,"cmd":"%s","id":"%s"}' "$conf" "$CNI_COMMAND" "$CNI_CONTAINERID""#,
        );
        let out = run_delegate("fake", Command::Add, &args(dir.path()), b"{\"a\":1}\n")
            .unwrap()
            .unwrap();
        assert_eq!(out["seen"]["a"], 1);
        assert_eq!((out["cmd"].as_str(), out["id"].as_str()), (Some("ADD"), Some("c")));
    }

    #[test]
    fn reports_delegate_failures() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "err",
            r#"echo '{"code":11,"msg":"busy","details":"later"}'; exit 1"#,
        );
        script(dir.path(), "crash", "echo oops; exit 2");
        script(dir.path(), "silent", "exit 0");
        let e = run_delegate("err", Command::Del, &args(dir.path()), b"{}").unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            (11, "failed to delegate DEL to err: busy")
        );
        let e = run_delegate("crash", Command::Add, &args(dir.path()), b"{}").unwrap_err();
        assert_eq!(e.code(), CODE_INTERNAL);
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(
            run_delegate("silent", Command::Del, &args(dir.path()), b"{}").unwrap(),
            None
        );
    }
}
