//! The `CNI_*` environment of one invocation, read once by the binary and validated here.

use std::collections::HashMap;

use super::error::PluginError;

/// The operation the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach the container.
    Add,
    /// Detach it; must succeed when there is nothing to detach.
    Del,
    /// Check that an attachment is still as ADD left it (0.4.0 and later).
    Check,
    /// Report the supported versions.
    Version,
    /// Report whether ADDs can work now (1.1.0).
    Status,
    /// Collect garbage (1.1.0).
    Gc,
}

impl Command {
    /// The name the runtime uses, also the value of `CNI_COMMAND` for the delegate.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }
}

/// A validated CNI environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniArgs {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`; empty for VERSION, STATUS and GC.
    pub container_id: String,
    /// `CNI_NETNS`; may be empty for DEL.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, passed on as it is.
    pub args: String,
    /// `CNI_PATH`: the directories to look for the delegate in, colon-separated.
    pub path: String,
}

impl CniArgs {
    /// Reads the invocation from `env` (the process environment, as a map). The required
    /// variables are the spec's: ADD and CHECK need all of them, DEL may lack `CNI_NETNS`
    /// (the namespace may be gone), VERSION needs only the command.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, PluginError> {
        let get = |name: &str| env.get(name).cloned().unwrap_or_default();
        let command = match get("CNI_COMMAND").as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "" => return Err(PluginError::InvalidEnv("CNI_COMMAND is not set".into())),
            other => return Err(PluginError::InvalidEnv(format!("unknown CNI_COMMAND {other:?}"))),
        };
        let args = Self {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        };
        let required: &[(&str, &str)] = match command {
            Command::Add | Command::Check => &[
                ("CNI_CONTAINERID", &args.container_id),
                ("CNI_NETNS", &args.netns),
                ("CNI_IFNAME", &args.ifname),
                ("CNI_PATH", &args.path),
            ],
            Command::Del => &[
                ("CNI_CONTAINERID", &args.container_id),
                ("CNI_IFNAME", &args.ifname),
                ("CNI_PATH", &args.path),
            ],
            Command::Version | Command::Status | Command::Gc => &[],
        };
        let missing: Vec<&str> = required.iter().filter(|(_, v)| v.is_empty()).map(|(k, _)| *k).collect();
        if !missing.is_empty() {
            return Err(PluginError::InvalidEnv(format!(
                "{} needs {} to be set",
                command.as_str(),
                missing.join(", ")
            )));
        }
        if !args.container_id.is_empty() && !valid_container_id(&args.container_id) {
            // It names a file in the data directory: no path separators, no `..`.
            return Err(PluginError::InvalidEnv(format!(
                "CNI_CONTAINERID {:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'",
                args.container_id
            )));
        }
        Ok(args)
    }
}

/// The spec's container ID rule: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn valid_container_id(id: &str) -> bool {
    id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1.2_3"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn reads_a_complete_add() {
        let args = CniArgs::from_env(&env(ADD)).unwrap();
        assert_eq!(args.command, Command::Add);
        assert_eq!(args.container_id, "abc-1.2_3");
    }

    #[test]
    fn names_what_is_missing() {
        let e = CniArgs::from_env(&env(&ADD[..2])).unwrap_err();
        assert_eq!(e.code(), 4);
        assert_eq!(
            e.to_string(),
            "invalid environment: ADD needs CNI_NETNS, CNI_IFNAME, CNI_PATH to be set"
        );
        let del: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != "CNI_NETNS").collect();
        let mut del = env(&del);
        del.insert("CNI_COMMAND".into(), "DEL".into());
        assert!(CniArgs::from_env(&del).is_ok(), "DEL works without a namespace");
        assert!(CniArgs::from_env(&env(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert_eq!(CniArgs::from_env(&env(&[])).unwrap_err().code(), 4);
        assert_eq!(
            CniArgs::from_env(&env(&[("CNI_COMMAND", "NOPE")])).unwrap_err().code(),
            4
        );
    }

    #[test]
    fn container_ids_cannot_escape_the_data_dir() {
        for bad in ["../etc/passwd", "a/b", ".hidden", "-x"] {
            let mut e = env(ADD);
            e.insert("CNI_CONTAINERID".into(), bad.into());
            assert!(CniArgs::from_env(&e).is_err(), "{bad}");
        }
    }
}
