//! Runs the netfilter tools: an argument vector (never a shell), optional stdin, a time
//! limit, and errors that name the command, the object and the tool's stderr.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;
use tracing::trace;

use super::{TrafficError, IPTABLES_HINT, NFT_HINT};

/// How long one command may take. `iptables-restore --wait` waits for the xtables lock
/// without a limit; past this we kill it rather than stall the resync forever (a killed
/// restore commits nothing: the kernel applies a table in one call).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Which tool a command belongs to, for the operator hint in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tool {
    /// iptables, ip6tables and their -save/-restore twins.
    Iptables,
    /// nft.
    Nft,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Iptables => "iptables",
            Tool::Nft => "nft (nftables)",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Tool::Iptables => IPTABLES_HINT,
            Tool::Nft => NFT_HINT,
        }
    }
}

/// Starts commands, optionally behind a prefix such as `ip netns exec <ns>`.
#[derive(Debug)]
pub(crate) struct Exec {
    /// Prepended to every command line.
    prefix: Vec<String>,
}

impl Exec {
    /// An executor with this prefix (empty: run the tools directly).
    pub(crate) fn new(prefix: Vec<String>) -> Self {
        Self { prefix }
    }

    /// Runs `program args...` with `stdin` and returns its stdout. `object` names the
    /// table or chain for the error message.
    pub(crate) async fn run(
        &self,
        tool: Tool,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        object: &str,
    ) -> Result<String, TrafficError> {
        let argv: Vec<&str> = self
            .prefix
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(program))
            .chain(args.iter().copied())
            .collect();
        let command = argv.join(" ");
        trace!(%command, input = stdin.unwrap_or(""), "running");
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            // Untranslated messages: stderr is parsed ("No such file or directory").
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|error| TrafficError::Spawn {
            command: command.clone(),
            tool: tool.name(),
            error,
        })?;
        let pipe = child.stdin.take();
        // Feed stdin while collecting the output, so neither side can block the other.
        let feed = async move {
            if let (Some(mut pipe), Some(input)) = (pipe, stdin) {
                // A write error means the tool exited early; its status says why.
                let _ = pipe.write_all(input.as_bytes()).await;
                let _ = pipe.shutdown().await;
            }
        };
        let both = async { tokio::join!(feed, child.wait_with_output()).1 };
        let output = match tokio::time::timeout(COMMAND_TIMEOUT, both).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => {
                return Err(TrafficError::Spawn {
                    command,
                    tool: tool.name(),
                    error,
                })
            }
            Err(_) => {
                return Err(TrafficError::Timeout {
                    command,
                    object: object.to_string(),
                    timeout: COMMAND_TIMEOUT,
                })
            }
        };
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(TrafficError::Failed {
            command,
            object: object.to_string(),
            status: output.status.to_string(),
            stderr: with_failed_line(stderr.trim(), stdin),
            hint: tool.hint(),
        })
    }
}

/// `iptables-restore` reports only "line N failed"; append that input line so the error
/// shows the rule itself.
pub(crate) fn with_failed_line(stderr: &str, input: Option<&str>) -> String {
    let line_no = stderr.split("line ").skip(1).find_map(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        rest[digits.len()..]
            .starts_with(" failed")
            .then(|| digits.parse::<usize>().ok())
            .flatten()
    });
    match (line_no, input) {
        (Some(n), Some(input)) if n > 0 => match input.lines().nth(n - 1) {
            Some(line) => format!("{stderr} (line {n}: {line})"),
            None => stderr.to_string(),
        },
        _ => stderr.to_string(),
    }
}

/// Whether a failure says the object does not exist (nft's ENOENT message, iptables'
/// "does not exist"), as opposed to the tool being broken.
pub(crate) fn is_not_found(err: &TrafficError) -> bool {
    matches!(err, TrafficError::Failed { stderr, .. }
        if stderr.contains("No such file or directory") || stderr.contains("does not exist"))
}
