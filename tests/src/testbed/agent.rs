//! flanneld on the nodes of a [`Testbed`]: start, wait until ready, stop, kill, restart,
//! pause.
//!
//! Each agent runs as `ip netns exec <node> flanneld ...`, so it sees the node's network and a
//! /sys mounted for it. Its eBPF pins go to a bpffs that the testbed mounts in its own state
//! directory rather than under /sys/fs/bpf: `ip netns exec` replaces /sys in the agent's mount
//! namespace (hiding any bpffs there), while a mount elsewhere is inherited by every agent
//! start, so pins survive an agent restart exactly as they survive one on a real node.

use std::ffi::CString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::cluster::Testbed;
use super::probe;
use crate::process::ChildGuard;

/// The healthz port agents get unless the test passes its own `--healthz-port`. Every node
/// has its own namespace, so one fixed port serves them all.
pub const AGENT_HEALTHZ_PORT: u16 = 9253;
/// How long a SIGTERM'd agent may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often `wait_ready` asks again.
const READY_POLL: Duration = Duration::from_millis(100);
/// How many lines of agent output error messages show.
const LOG_LINES: usize = 40;

/// Where the flanneld binary is: `$FLANNELD_BIN`, else beside the running binary or its
/// directory (`target/<profile>/flanneld` for `target/<profile>/deps/<test>` and for
/// `target/<profile>/xtask`), else the workspace's `target/debug/flanneld`.
pub fn flanneld_path() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLANNELD_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("FLANNELD_BIN={} does not exist", path.display());
        }
        return Ok(path);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // A test binary is in target/<profile>/deps, xtask in target/<profile>.
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join("flanneld"));
        }
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    candidates.push(workspace.join("target/debug/flanneld"));
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "flanneld not found (looked at {}); build it with cargo build -p flannel-agent, or set FLANNELD_BIN",
        looked.join(", ")
    )
}

/// The value of `--name`/`-name` in `args` (`--name=v` or `--name v`), if given.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let Some(body) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            continue;
        };
        match body.split_once('=') {
            Some((key, value)) if key == name => return Some(value),
            None if body == name => return iter.next().map(String::as_str),
            _ => {}
        }
    }
    None
}

impl Testbed {
    /// Starts flanneld on node `number` with the testbed's defaults (etcd endpoint and prefix,
    /// TLS files; in kube mode `--kube-subnet-mgr`, the kubeconfig, net-conf.json and
    /// `NODE_NAME` instead), `--iface=eth0`, `--subnet-file`, `--bpf-pin-dir`, `--healthz-port`) followed
    /// by `extra_args`. A default is left out when `extra_args` sets the same flag. Does not
    /// wait: see [`Self::wait_ready`].
    pub async fn start_agent(&mut self, number: usize, extra_args: &[&str]) -> anyhow::Result<()> {
        let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        self.spawn_agent(number, extra)
    }

    fn spawn_agent(&mut self, number: usize, extra: Vec<String>) -> anyhow::Result<()> {
        let node = self.node(number).clone();
        if self.agents[number - 1]
            .process
            .as_mut()
            .is_some_and(ChildGuard::is_running)
        {
            bail!("an agent already runs on {}", node.name);
        }
        let binary = match &self.options.flanneld {
            Some(path) => path.clone(),
            None => flanneld_path()?,
        };
        let pin_dir = self.bpf_pin_dir(number)?;

        let kube = self.kube_agent_defaults(number);
        let mut defaults = match &kube {
            Some(kube) => kube.flags.clone(),
            None => vec![
                ("etcd-endpoints", self.etcd_endpoint()?),
                ("etcd-prefix", self.options.etcd_prefix.clone()),
            ],
        };
        defaults.extend([
            ("iface", "eth0".to_owned()),
            ("subnet-file", node.subnet_file().display().to_string()),
            ("bpf-pin-dir", pin_dir.display().to_string()),
            ("healthz-port", AGENT_HEALTHZ_PORT.to_string()),
        ]);
        if let Some(tls) = self.etcd.as_ref().and_then(|e| e.tls()) {
            defaults.push(("etcd-cafile", tls.ca.display().to_string()));
            defaults.push(("etcd-certfile", tls.client_cert.display().to_string()));
            defaults.push(("etcd-keyfile", tls.client_key.display().to_string()));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns]).arg(&binary);
        if let Some(kube) = &kube {
            // `ip netns exec` passes the environment on.
            cmd.env("NODE_NAME", &kube.node_name);
            if !extra
                .iter()
                .any(|a| a.trim_start_matches('-').starts_with("kube-subnet-mgr"))
            {
                cmd.arg("--kube-subnet-mgr");
            }
        }
        for (flag, value) in defaults {
            if flag_value(&extra, flag).is_none() {
                cmd.arg(format!("--{flag}={value}"));
            }
        }
        cmd.args(&extra);

        let slot = &mut self.agents[number - 1];
        slot.starts += 1;
        let process = ChildGuard::spawn_in(&format!("flanneld.{}", slot.starts), cmd, &node.dir)
            .with_context(|| format!("starting flanneld on {}", node.name))?;
        slot.process = Some(process);
        slot.extra_args = extra;
        Ok(())
    }

    /// The bpffs directory for node `number`'s pins, mounting the testbed's bpffs first.
    pub fn bpf_pin_dir(&mut self, number: usize) -> anyhow::Result<PathBuf> {
        let root = self.state_dir.join("bpffs");
        if !self.bpffs_mounted {
            std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
            let target = CString::new(root.as_os_str().as_encoded_bytes())?;
            // SAFETY: all pointers are NUL-terminated strings that outlive the call; bpffs
            // takes no mount data.
            let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("mounting bpffs on {}", root.display()));
            }
            self.bpffs_mounted = true;
        }
        let dir = root.join(&self.node(number).name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Waits until node `number`'s agent answers `200` on `/readyz`, polling from inside the
    /// node. Fails at once, with the agent's last output, if it exits; fails after `timeout`
    /// with the last answer and the output.
    pub async fn wait_ready(&mut self, number: usize, timeout: Duration) -> anyhow::Result<()> {
        let node = self.node(number).clone();
        let slot = &mut self.agents[number - 1];
        let port = match flag_value(&slot.extra_args, "healthz-port") {
            Some(port) => port.parse().with_context(|| format!("--healthz-port={port}"))?,
            None => AGENT_HEALTHZ_PORT,
        };
        let addr = SocketAddr::new(node.ip.into(), port);
        let deadline = Instant::now() + timeout;
        loop {
            let process = slot
                .process
                .as_mut()
                .with_context(|| format!("no agent was started on {}", node.name))?;
            if let Some(status) = process.try_wait()? {
                bail!(
                    "flanneld on {} exited ({status}) before it was ready\n{}",
                    node.name,
                    process.log_tail(LOG_LINES)
                );
            }
            let last = match probe::http_get(&node.netns, addr, "/readyz").await {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "flanneld on {} was not ready within {timeout:?} (last /readyz: {last})\n{}",
                    node.name,
                    process.log_tail(LOG_LINES)
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Stops node `number`'s agent with SIGTERM (SIGKILL after 10 s) and returns its exit
    /// status; `None` if none ran.
    pub async fn stop_agent(&mut self, number: usize) -> anyhow::Result<Option<ExitStatus>> {
        self.node(number);
        match self.agents[number - 1].process.as_mut() {
            Some(process) => Ok(Some(process.terminate(STOP_GRACE).await?)),
            None => Ok(None),
        }
    }

    /// Kills node `number`'s agent with SIGKILL, as a crash would; `None` if none ran.
    pub fn kill_agent(&mut self, number: usize) -> anyhow::Result<Option<ExitStatus>> {
        self.node(number);
        self.agents[number - 1]
            .process
            .as_mut()
            .map(ChildGuard::kill)
            .transpose()
    }

    /// Stops node `number`'s agent if it runs, then starts it again with the same extra
    /// arguments. Does not wait for readiness.
    pub async fn restart_agent(&mut self, number: usize) -> anyhow::Result<()> {
        self.stop_agent(number).await?;
        let extra = self.agents[number - 1].extra_args.clone();
        self.spawn_agent(number, extra)
    }

    /// Freezes node `number`'s agent (SIGSTOP), as a stuck process; its datapath stays.
    pub fn pause_agent(&mut self, number: usize) -> anyhow::Result<()> {
        self.agent(number)?.signal(libc::SIGSTOP)
    }

    /// Resumes an agent frozen by [`Self::pause_agent`] (SIGCONT).
    pub fn resume_agent(&mut self, number: usize) -> anyhow::Result<()> {
        self.agent(number)?.signal(libc::SIGCONT)
    }

    /// The current (or last) agent process of node `number`, e.g. for `wait_for_log_line`.
    pub fn agent(&mut self, number: usize) -> anyhow::Result<&mut ChildGuard> {
        let name = self.node(number).name.clone();
        self.agents[number - 1]
            .process
            .as_mut()
            .with_context(|| format!("no agent was started on {name}"))
    }

    /// Everything the current (or last) agent of node `number` logged (stdout, then stderr).
    pub fn agent_logs(&mut self, number: usize) -> anyhow::Result<String> {
        let agent = self.agent(number)?;
        Ok(format!("{}{}", agent.stdout(), agent.stderr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn finds_flags_in_every_spelling() {
        let a = args(&["--iface=eth1", "-healthz-port", "8080", "--ip-masq"]);
        assert_eq!(flag_value(&a, "iface"), Some("eth1"));
        assert_eq!(flag_value(&a, "healthz-port"), Some("8080"));
        assert_eq!(flag_value(&a, "iface-regex"), None);
        assert_eq!(flag_value(&args(&["--iface-regex=e.*"]), "iface"), None);
    }
}
