//! Command-line flags of `flanneld`, with upstream's names, defaults and parsing rules.
//!
//! Upstream parses with Go's `flag` package and then applies `FLANNELD_*` environment
//! variables with coreos/pkg `flagutil.SetFlagsFromEnv`. Scripts, manifests and Helm
//! charts written for upstream must keep working, so this module copies the parts a
//! user can see: `-flag` and `--flag`, `-flag=value` and `-flag value`, booleans that
//! take a value only after `=`, Go's integer and boolean literals, env names, "command
//! line wins over env" and "empty env values are ignored".
//!
//! The [`Flags`] struct is a clap derive: its `///` docs are the `--help` text and its
//! attributes hold names, defaults and value parsers. The Go-compatible tokenizer and
//! the Go-style usage text live in `goflag`. The environment is passed in as a map so
//! tests never touch the process environment; after [`parse_from`] nothing reads it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

mod goflag;
#[cfg(test)]
mod tests;

/// Every flag of `flanneld`, after command line and environment have been applied.
///
/// The `///` text of each field is its `-h` text (upstream's wording). `value_name` is
/// the Go type shown by `-h`: `string`, `int`, or `value` for repeatable and klog
/// flags; booleans are recognised by their `bool` value parser. Empty strings mean
/// "not set", as in upstream (`--public-ip=` is the same as no `--public-ip`).
#[derive(Parser, Clone, PartialEq, Eq, Debug)]
#[command(name = "flanneld", disable_help_flag = true, disable_version_flag = true)]
// Go's `flag` keeps the last value of a repeated flag; clap would reject the repeat.
#[command(args_override_self = true)]
pub struct Flags {
    /// a comma-delimited list of etcd endpoints
    #[arg(long, env = "FLANNELD_ETCD_ENDPOINTS", value_name = "string")]
    #[arg(default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379")]
    #[arg(action = ArgAction::Set, value_parser = parse_endpoints)]
    pub etcd_endpoints: Endpoints,

    /// etcd prefix
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        value_name = "string",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// SSL key file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", value_name = "string", default_value = "")]
    pub etcd_keyfile: String,

    /// SSL certification file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", value_name = "string", default_value = "")]
    pub etcd_certfile: String,

    /// SSL Certificate Authority file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", value_name = "string", default_value = "")]
    pub etcd_cafile: String,

    /// username for BasicAuth to etcd
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", value_name = "string", default_value = "")]
    pub etcd_username: String,

    /// password for BasicAuth to etcd
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", value_name = "string", default_value = "")]
    #[arg(value_parser = parse_secret)]
    pub etcd_password: Secret,

    /// interface to use (IP or name) for inter-host communication. Can be specified multiple times to check each option in order. Returns the first match found.
    #[arg(long, env = "FLANNELD_IFACE", value_name = "value", action = ArgAction::Append, verbatim_doc_comment)]
    pub iface: Vec<String>,

    /// regex expression to match the first interface to use (IP or name) for inter-host communication. Can be specified multiple times to check each regex in order. Returns the first match found. Regexes are checked after specific interfaces specified by the iface option have already been checked.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_name = "value", action = ArgAction::Append)]
    #[arg(verbatim_doc_comment)]
    pub iface_regex: Vec<String>,

    // `expect` would go unfulfilled outside rustdoc, where this lint never runs.
    #[allow(
        rustdoc::invalid_html_tags,
        reason = "upstream's help text, verbatim: '<ip-address>' is not HTML"
    )]
    /// detect interface to use (IP or name) for inter-host communication based on which will be used for provided IP. This is exactly the interface to use of command 'ip route get <ip-address>'
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", value_name = "string", default_value = "")]
    pub iface_can_reach: String,

    /// filename where env variables (subnet, MTU, ... ) will be written to
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        value_name = "string",
        default_value = "/run/flannel/subnet.env"
    )]
    #[arg(value_parser = parse_path)]
    pub subnet_file: PathBuf,

    /// IP accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IP", value_name = "string", default_value = "")]
    pub public_ip: String,

    /// IPv6 accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", value_name = "string", default_value = "")]
    pub public_ipv6: String,

    /// subnet lease renewal margin, in minutes, ranging from 1 to 1439
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        value_name = "int",
        default_value = "60"
    )]
    #[arg(value_parser = parse_go_int)]
    pub subnet_lease_renew_margin: i64,

    /// setup IP masquerade rule for traffic destined outside of overlay network
    #[arg(long, env = "FLANNELD_IP_MASQ", default_value = "false")]
    #[arg(action = ArgAction::Set, value_parser = parse_go_bool)]
    pub ip_masq: bool,

    /// disable fully-random mode for MASQUERADE
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", default_value = "false")]
    #[arg(action = ArgAction::Set, value_parser = parse_go_bool)]
    pub ip_masq_fully_random_disable: bool,

    /// contact the Kubernetes API for subnet assignment instead of etcd.
    #[arg(
        long,
        env = "FLANNELD_KUBE_SUBNET_MGR",
        default_value = "false",
        verbatim_doc_comment
    )]
    #[arg(action = ArgAction::Set, value_parser = parse_go_bool)]
    pub kube_subnet_mgr: bool,

    /// Kubernetes API server URL. Does not need to be specified if flannel is running in a pod.
    #[arg(
        long,
        env = "FLANNELD_KUBE_API_URL",
        value_name = "string",
        default_value = "",
        verbatim_doc_comment
    )]
    pub kube_api_url: String,

    /// Kubernetes annotation prefix. Can contain single slash "/", otherwise it will be appended at the end.
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        value_name = "string",
        verbatim_doc_comment
    )]
    #[arg(default_value = "flannel.alpha.coreos.com")]
    pub kube_annotation_prefix: String,

    /// kubeconfig file location. Does not need to be specified if flannel is running in a pod.
    #[arg(
        long,
        env = "FLANNELD_KUBECONFIG_FILE",
        value_name = "string",
        default_value = "",
        verbatim_doc_comment
    )]
    #[arg(value_parser = parse_path)]
    pub kubeconfig_file: PathBuf,

    /// print version and exit
    // No `env`: upstream checks --version before it applies the environment, so
    // FLANNELD_VERSION has never had an effect.
    #[arg(long, default_value = "false", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub version: bool,

    /// the IP address for healthz server to listen
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", value_name = "string", default_value = "0.0.0.0")]
    pub healthz_ip: String,

    /// the port for healthz server to listen(0 to disable)
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", value_name = "int", default_value = "0", value_parser = parse_port)]
    pub healthz_port: u16,

    /// resync period for iptables rules, in seconds
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", value_name = "int", default_value = "5")]
    #[arg(value_parser = parse_resync)]
    pub iptables_resync: u64,

    /// add default accept rules to FORWARD chain in iptables
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", default_value = "true")]
    #[arg(action = ArgAction::Set, value_parser = parse_go_bool)]
    pub iptables_forward_rules: bool,

    /// add a blackhole route on the node for the local podCIDR
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", default_value = "false")]
    #[arg(action = ArgAction::Set, value_parser = parse_go_bool)]
    pub ip_blackhole_route: bool,

    /// path to the network configuration file
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", value_name = "string")]
    #[arg(default_value = "/etc/kube-flannel/net-conf.json", value_parser = parse_path)]
    pub net_config_path: PathBuf,

    /// set NodeNetworkUnavailable after ready
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", default_value = "true")]
    #[arg(action = ArgAction::Set, value_parser = parse_go_bool)]
    pub set_node_network_unavailable: bool,

    /// number for the log level verbosity
    #[arg(long = "v", env = "FLANNELD_V", value_name = "value", default_value = "0", value_parser = parse_klog_level)]
    pub v: i32,

    /// comma-separated list of pattern=N settings for file-filtered logging (accepted for compatibility and ignored)
    #[arg(long, env = "FLANNELD_VMODULE", value_name = "value", default_value = "")]
    pub vmodule: String,

    /// when logging hits line file:N, emit a stack trace (accepted for compatibility and ignored)
    #[arg(
        long = "log_backtrace_at",
        env = "FLANNELD_LOG_BACKTRACE_AT",
        value_name = "value",
        default_value = ""
    )]
    pub log_backtrace_at: String,

    /// flannel-rs addition: directory in bpffs where the eBPF maps and programs are pinned
    #[arg(
        long,
        env = "FLANNELD_BPF_PIN_DIR",
        value_name = "string",
        default_value = "/sys/fs/bpf/flannel"
    )]
    #[arg(value_parser = parse_path)]
    pub bpf_pin_dir: PathBuf,

    /// flannel-rs addition: the CNI plugin binary to keep installed at -cni-plugin-dest (empty: do not install)
    #[arg(long, env = "FLANNELD_CNI_PLUGIN_SOURCE", value_name = "string", default_value = "")]
    #[arg(value_parser = parse_path)]
    pub cni_plugin_source: PathBuf,

    /// flannel-rs addition: where the CNI plugin binary is kept installed, e.g. /opt/cni/bin/flannel
    #[arg(long, env = "FLANNELD_CNI_PLUGIN_DEST", value_name = "string", default_value = "")]
    #[arg(value_parser = parse_path)]
    pub cni_plugin_dest: PathBuf,

    /// flannel-rs addition: the CNI conflist to keep installed at -cni-conf-dest (empty: do not install)
    #[arg(long, env = "FLANNELD_CNI_CONF_SOURCE", value_name = "string", default_value = "")]
    #[arg(value_parser = parse_path)]
    pub cni_conf_source: PathBuf,

    /// flannel-rs addition: where the CNI conflist is kept installed, e.g. /etc/cni/net.d/10-flannel.conflist
    #[arg(long, env = "FLANNELD_CNI_CONF_DEST", value_name = "string", default_value = "")]
    #[arg(value_parser = parse_path)]
    pub cni_conf_dest: PathBuf,

    /// flannel-rs addition: log line format, text or json
    #[arg(long, env = "FLANNELD_LOG_FORMAT", value_name = "string", default_value = "text")]
    #[arg(value_parser = parse_log_format)]
    pub log_format: LogFormat,
}

/// The etcd endpoints, split on `,` exactly like Go's `strings.Split` (no trimming,
/// empty items kept), so a value means the same thing to both daemons.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Endpoints(pub Vec<String>);

impl std::ops::Deref for Endpoints {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

/// A secret flag value. Its `Debug` never prints the value, so logging the flags
/// cannot leak it (upstream logs `CLI flags config: %+v` with the etcd password in it).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it (the etcd client).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty, i.e. not set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Saying whether it is set helps debugging auth problems without leaking it.
        f.write_str(if self.0.is_empty() { "\"\"" } else { "<redacted>" })
    }
}

/// Log line format of the agent (flannel-rs addition).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What the command line asks for. The caller decides how to exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run the daemon with these flags.
    Run(Box<Flags>),
    /// `-h`/`--help`: print this usage text to stdout and exit 0.
    Help(String),
    /// `--version`: print the version to stderr and exit 0.
    Version,
}

/// A command line or environment that cannot be used. `Display` is the one-line
/// message (Go's wording where Go has one): print it to stderr, followed by [`usage`]
/// when the exit code is 2, and exit with [`FlagsError::exit_code`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagsError {
    /// A flag that does not exist.
    #[error("flag provided but not defined: -{name}")]
    Unknown {
        /// The name as given, without dashes.
        name: String,
    },
    /// A non-boolean flag at the end of the command line, with no value.
    #[error("flag needs an argument: -{name}")]
    MissingValue {
        /// The flag name.
        name: String,
    },
    /// A token that starts with a dash but is not a flag (`---x`, `-=x`).
    #[error("bad flag syntax: {token}")]
    BadSyntax {
        /// The token as given.
        token: String,
    },
    /// A flag value that does not parse.
    #[error("invalid value {value:?} for flag -{name}: {reason}")]
    InvalidValue {
        /// The flag name.
        name: String,
        /// The value as given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A `FLANNELD_*` value that does not parse. Upstream logs this and carries on with
    /// the default; a silently ignored setting is worse than a failed start, so we stop.
    #[error("invalid value {value:?} for {var}: {reason}")]
    InvalidEnv {
        /// The environment variable.
        var: String,
        /// Its value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A word that is not a flag right after a boolean flag: `--ip-masq false`.
    /// Go stops parsing there, so upstream runs with ip-masq=true and silently drops
    /// every later flag; we refuse instead.
    #[error("unexpected argument {arg:?} after -{flag}: a boolean flag takes a value only as -{flag}={arg}")]
    BoolValueAfterSpace {
        /// The boolean flag.
        flag: String,
        /// The word that followed it.
        arg: String,
    },
    /// Any other word that is not a flag (Go would stop parsing and ignore the rest).
    #[error("unexpected argument {arg:?}: flanneld takes no positional arguments")]
    Positional {
        /// The word.
        arg: String,
    },
    /// `--subnet-lease-renew-margin` outside 1..=1439 (upstream's text, then the value).
    #[error("Invalid subnet-lease-renew-margin option, out of acceptable range: {minutes} (use 1 to 1439 minutes)")]
    RenewMarginOutOfRange {
        /// The value given.
        minutes: i64,
    },
    /// clap rejected a command line that the tokenizer accepted (a bug here).
    #[error("internal flag parsing error: {0}")]
    Internal(String),
}

impl FlagsError {
    /// The process exit code: 2 for a command line that does not parse (Go's
    /// `flag.ExitOnError`), 1 for a failed validation (upstream's renew-margin check).
    ///
    /// Upstream's own parse errors exit 0 (its usage function calls `os.Exit(0)`
    /// before `ExitOnError` gets to exit 2), which hides typos from supervisors.
    pub fn exit_code(&self) -> i32 {
        match self {
            FlagsError::RenewMarginOutOfRange { .. } => 1,
            _ => 2,
        }
    }
}

/// Parses `args` (with the program name first) and the `FLANNELD_*` entries of `env`.
///
/// Order as upstream: command line, then `--version`, then the environment for every
/// flag the command line did not set (empty values ignored, repeatable flags get one
/// entry), then validation.
pub fn parse_from<I, T>(args: I, env: &HashMap<String, String>) -> Result<Invocation, FlagsError>
where
    I: IntoIterator<Item = T>,
    T: Into<String>,
{
    let cmd = command();
    let args: Vec<String> = args.into_iter().skip(1).map(Into::into).collect();
    let cli = match goflag::tokenize(&cmd, &args)? {
        goflag::Tokens::Help => return Ok(Invocation::Help(usage())),
        goflag::Tokens::Flags(cli) => cli,
    };
    let from_cli = build(&cmd, &cli)?;
    if from_cli.version {
        return Ok(Invocation::Version);
    }

    let set_on_cli: HashSet<&str> = cli.iter().map(|(name, _)| name.as_str()).collect();
    let mut all = cli.clone();
    for (name, var) in env_vars() {
        let Some(value) = env.get(&var).filter(|v| !v.is_empty()) else {
            continue;
        };
        if set_on_cli.contains(name.as_str()) {
            continue;
        }
        goflag::check_value(&cmd, &name, value).map_err(|reason| FlagsError::InvalidEnv {
            var: var.clone(),
            value: value.clone(),
            reason,
        })?;
        all.push((name, value.clone()));
    }

    let flags = build(&cmd, &all)?;
    flags.validate()?;
    Ok(Invocation::Run(Box::new(flags)))
}

/// [`parse_from`] on the process arguments and environment; for `main` only.
pub fn parse() -> Result<Invocation, FlagsError> {
    // Non-UTF-8 env values cannot be flag values anyway; Go would see them as bytes
    // that fail to parse or end up in a path, neither of which a node agent needs.
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("FLANNELD_"))
        .collect();
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    parse_from(args, &env)
}

/// The `-h` text: `Usage: flanneld [OPTION]...` and the flags in Go's `PrintDefaults` layout.
pub fn usage() -> String {
    goflag::usage(&command())
}

impl Flags {
    /// All flags for a log line, with the etcd password redacted (upstream logs it).
    pub fn redacted_debug(&self) -> String {
        // `Secret`'s Debug does the redaction, so this is just the derived Debug.
        format!("{self:?}")
    }

    /// Upstream's validation after parsing; only the renew margin has a rule.
    fn validate(&self) -> Result<(), FlagsError> {
        if !(1..24 * 60).contains(&self.subnet_lease_renew_margin) {
            return Err(FlagsError::RenewMarginOutOfRange {
                minutes: self.subnet_lease_renew_margin,
            });
        }
        Ok(())
    }
}

impl Default for Flags {
    /// Every flag at its upstream default.
    fn default() -> Self {
        build(&command(), &[]).expect("the built-in defaults parse")
    }
}

/// The clap command with `env` removed from every argument: clap would fall back to
/// the process environment while parsing, and we apply the caller's map instead.
fn command() -> clap::Command {
    Flags::command().mut_args(|arg| arg.env(None::<&str>))
}

/// `(flag, env var)` for every flag that the environment can set, from the `env`
/// attributes above (a test checks they follow [`env_name`]).
fn env_vars() -> Vec<(String, String)> {
    Flags::command()
        .get_arguments()
        .filter_map(|arg| Some((arg.get_long()?.to_owned(), arg.get_env()?.to_str()?.to_owned())))
        .collect()
}

/// `FLANNELD_` + the flag name upper-cased with `-` and `.` turned into `_`.
pub fn env_name(flag: &str) -> String {
    format!("FLANNELD_{}", flag.to_uppercase().replace(['-', '.'], "_"))
}

/// Turns already tokenized `--name=value` pairs into [`Flags`] through clap.
fn build(cmd: &clap::Command, pairs: &[(String, String)]) -> Result<Flags, FlagsError> {
    let argv = std::iter::once("flanneld".to_owned()).chain(pairs.iter().map(|(n, v)| format!("--{n}={v}")));
    let matches = cmd
        .clone()
        .try_get_matches_from(argv)
        .map_err(|e| FlagsError::Internal(e.to_string()))?;
    Flags::from_arg_matches(&matches).map_err(|e| FlagsError::Internal(e.to_string()))
}

/// Go's `strconv.ParseBool`: the only spellings upstream accepts.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("parse error (use true or false)".to_owned()),
    }
}

fn parse_go_int(s: &str) -> Result<i64, String> {
    goflag::parse_go_int(s)
}

/// klog parses `-v` with `strconv.ParseInt(s, 10, 32)`: decimal only.
fn parse_klog_level(s: &str) -> Result<i32, String> {
    s.parse::<i32>().map_err(|e| format!("parse error ({e})"))
}

/// Upstream takes any int and fails later at listen time; a port out of range is a
/// typo that should stop the daemon before it does anything.
fn parse_port(s: &str) -> Result<u16, String> {
    let n = goflag::parse_go_int(s)?;
    u16::try_from(n).map_err(|_| format!("port {n} is out of range (use 0 to 65535; 0 disables healthz)"))
}

/// Upstream accepts 0 or a negative period, after which the rules are never checked
/// again (Go's `time.Tick` returns nil); that is never what the user meant.
fn parse_resync(s: &str) -> Result<u64, String> {
    let n = goflag::parse_go_int(s)?;
    u64::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("resync period {n} is out of range (use 1 or more seconds)"))
}

/// Go's string flags take any value, the empty one included; clap's `PathBuf`
/// parser would refuse an empty path (the "not set" default of --kubeconfig-file).
fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

fn parse_endpoints(s: &str) -> Result<Endpoints, String> {
    Ok(Endpoints(s.split(',').map(str::to_owned).collect()))
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_owned()))
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("use text or json".to_owned()),
    }
}
