use std::collections::HashMap;
use std::path::PathBuf;

use super::*;

fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn run_with(args: &[&str], env: &HashMap<String, String>) -> Flags {
    let argv = std::iter::once("flanneld").chain(args.iter().copied());
    match parse_from(argv, env) {
        Ok(Invocation::Run(flags)) => *flags,
        other => panic!("{args:?}: expected Run, got {other:?}"),
    }
}

fn run(args: &[&str]) -> Flags {
    run_with(args, &no_env())
}

fn err(args: &[&str]) -> FlagsError {
    err_with(args, &no_env())
}

fn err_with(args: &[&str], env: &HashMap<String, String>) -> FlagsError {
    let argv = std::iter::once("flanneld").chain(args.iter().copied());
    match parse_from(argv, env) {
        Err(e) => e,
        other => panic!("{args:?}: expected an error, got {other:?}"),
    }
}

#[test]
fn every_flag_has_upstreams_default() {
    let f = run(&[]);
    assert_eq!(f.etcd_endpoints.0, ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]);
    assert_eq!(f.etcd_prefix, "/coreos.com/network");
    assert_eq!(f.etcd_keyfile, "");
    assert_eq!(f.etcd_certfile, "");
    assert_eq!(f.etcd_cafile, "");
    assert_eq!(f.etcd_username, "");
    assert!(f.etcd_password.is_empty());
    assert!(f.iface.is_empty());
    assert!(f.iface_regex.is_empty());
    assert_eq!(f.iface_can_reach, "");
    assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
    assert_eq!(f.public_ip, "");
    assert_eq!(f.public_ipv6, "");
    assert_eq!(f.subnet_lease_renew_margin, 60);
    assert!(!f.ip_masq);
    assert!(!f.ip_masq_fully_random_disable);
    assert!(!f.kube_subnet_mgr);
    assert_eq!(f.kube_api_url, "");
    assert_eq!(f.kube_annotation_prefix, "flannel.alpha.coreos.com");
    assert_eq!(f.kubeconfig_file, PathBuf::from(""));
    assert!(!f.version);
    assert_eq!(f.healthz_ip, "0.0.0.0");
    assert_eq!(f.healthz_port, 0);
    assert_eq!(f.iptables_resync, 5);
    assert!(f.iptables_forward_rules);
    assert!(!f.ip_blackhole_route);
    assert_eq!(f.net_config_path, PathBuf::from("/etc/kube-flannel/net-conf.json"));
    assert!(f.set_node_network_unavailable);
    assert_eq!(f.v, 0);
    assert_eq!(f.vmodule, "");
    assert_eq!(f.log_backtrace_at, "");
    assert_eq!(f.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/flannel"));
    assert_eq!(f.log_format, LogFormat::Text);
    assert_eq!(Flags::default(), f);
}

#[test]
fn single_and_double_dash_are_the_same() {
    let single = run(&["-etcd-prefix=/a", "-kube-subnet-mgr", "-iface", "eth1"]);
    let double = run(&["--etcd-prefix=/a", "--kube-subnet-mgr", "--iface", "eth1"]);
    assert_eq!(single, double);
    assert_eq!(single.etcd_prefix, "/a");
    assert!(single.kube_subnet_mgr);
    assert_eq!(single.iface, ["eth1"]);
}

#[test]
fn equals_and_space_forms() {
    for args in [
        &["--healthz-port=8080", "--public-ip=10.0.0.1"][..],
        &["--healthz-port", "8080", "--public-ip", "10.0.0.1"],
        &["-healthz-port", "8080", "-public-ip=10.0.0.1"],
    ] {
        let f = run(args);
        assert_eq!(f.healthz_port, 8080, "{args:?}");
        assert_eq!(f.public_ip, "10.0.0.1", "{args:?}");
    }
    // Go hands the next word to a non-boolean flag even if it starts with a dash.
    assert_eq!(run(&["-iface", "-odd"]).iface, ["-odd"]);
    // An empty value after '=' is a value.
    assert_eq!(run(&["--etcd-prefix="]).etcd_prefix, "");
}

#[test]
fn upstream_functional_test_command_line() {
    let f = run(&["-v", "10", "-subnet-file", "/vxlan.env", "-etcd-prefix=/vxlan/network"]);
    assert_eq!(f.v, 10);
    assert_eq!(f.subnet_file, PathBuf::from("/vxlan.env"));
    assert_eq!(f.etcd_prefix, "/vxlan/network");
}

#[test]
fn klog_verbosity_forms() {
    for args in [&["-v", "3"][..], &["-v=3"], &["--v=3"], &["--v", "3"]] {
        assert_eq!(run(args).v, 3, "{args:?}");
    }
    let f = run(&["-vmodule=foo=2", "-log_backtrace_at", "main.go:10"]);
    assert_eq!(
        (f.vmodule.as_str(), f.log_backtrace_at.as_str()),
        ("foo=2", "main.go:10")
    );
    // klog parses -v in base 10 only.
    assert!(matches!(err(&["-v=0x1"]), FlagsError::InvalidValue { name, .. } if name == "v"));
}

#[test]
fn booleans_follow_go() {
    assert!(run(&["--ip-masq"]).ip_masq);
    assert!(!run(&["--ip-masq=false"]).ip_masq);
    assert!(run(&["--ip-masq=true"]).ip_masq);
    assert!(!run(&["-iptables-forward-rules=false"]).iptables_forward_rules);
    assert!(!run(&["--set-node-network-unavailable=0"]).set_node_network_unavailable);
    for t in ["1", "t", "T", "true", "TRUE", "True"] {
        assert!(run(&[&format!("--ip-blackhole-route={t}")]).ip_blackhole_route, "{t}");
    }
    for f in ["0", "f", "F", "false", "FALSE", "False"] {
        assert!(
            !run(&[&format!("--iptables-forward-rules={f}")]).iptables_forward_rules,
            "{f}"
        );
    }
    let e = err(&["--ip-masq=yes"]);
    assert!(matches!(&e, FlagsError::InvalidValue { name, value, .. } if name == "ip-masq" && value == "yes"));
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn boolean_does_not_take_the_next_word() {
    let e = err(&["--ip-masq", "false", "--iface", "eth0"]);
    assert_eq!(
        e,
        FlagsError::BoolValueAfterSpace {
            flag: "ip-masq".into(),
            arg: "false".into()
        }
    );
    assert!(e.to_string().contains("-ip-masq=false"), "{e}");
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn environment_applies_to_unset_flags() {
    let f = run_with(
        &[],
        &env(&[
            ("FLANNELD_ETCD_ENDPOINTS", "https://a:2379,https://b:2379"),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "30"),
            ("FLANNELD_PUBLIC_IP", "192.0.2.1"),
            ("FLANNELD_V", "4"),
            ("FLANNELD_LOG_BACKTRACE_AT", "x.go:1"),
            ("FLANNELD_LOG_FORMAT", "json"),
            ("FLANNELD_IPTABLES_FORWARD_RULES", "false"),
            ("UNRELATED", "x"),
        ]),
    );
    assert_eq!(f.etcd_endpoints.0, ["https://a:2379", "https://b:2379"]);
    assert!(f.ip_masq);
    assert_eq!(f.subnet_lease_renew_margin, 30);
    assert_eq!(f.public_ip, "192.0.2.1");
    assert_eq!(f.v, 4);
    assert_eq!(f.log_backtrace_at, "x.go:1");
    assert_eq!(f.log_format, LogFormat::Json);
    assert!(!f.iptables_forward_rules);
}

#[test]
fn command_line_beats_environment() {
    let e = env(&[
        ("FLANNELD_PUBLIC_IP", "192.0.2.1"),
        ("FLANNELD_IFACE", "eth9"),
        ("FLANNELD_IP_MASQ", "true"),
    ]);
    let f = run_with(
        &[
            "--public-ip=198.51.100.1",
            "--iface=eth0",
            "--iface=eth1",
            "--ip-masq=false",
        ],
        &e,
    );
    assert_eq!(f.public_ip, "198.51.100.1");
    assert_eq!(f.iface, ["eth0", "eth1"]);
    assert!(!f.ip_masq);
}

#[test]
fn empty_environment_values_are_ignored() {
    let f = run_with(
        &[],
        &env(&[
            ("FLANNELD_ETCD_PREFIX", ""),
            ("FLANNELD_IFACE", ""),
            ("FLANNELD_IPTABLES_FORWARD_RULES", ""),
            ("FLANNELD_HEALTHZ_PORT", ""),
        ]),
    );
    assert_eq!(f.etcd_prefix, "/coreos.com/network");
    assert!(f.iface.is_empty());
    assert!(f.iptables_forward_rules);
    assert_eq!(f.healthz_port, 0);
}

#[test]
fn repeatable_flags_keep_order_and_env_adds_one_entry() {
    let f = run(&[
        "--iface=eth0",
        "-iface",
        "10.0.0.1",
        "--iface-regex=^en",
        "-iface-regex",
        "10\\.0\\..*",
    ]);
    assert_eq!(f.iface, ["eth0", "10.0.0.1"]);
    assert_eq!(f.iface_regex, ["^en", "10\\.0\\..*"]);
    // No comma splitting: the whole value is one entry.
    let f = run_with(
        &[],
        &env(&[("FLANNELD_IFACE", "eth0,eth1"), ("FLANNELD_IFACE_REGEX", "a,b")]),
    );
    assert_eq!(f.iface, ["eth0,eth1"]);
    assert_eq!(f.iface_regex, ["a,b"]);
}

#[test]
fn repeated_single_value_flags_keep_the_last() {
    let f = run(&[
        "--etcd-prefix=/a",
        "--etcd-prefix=/b",
        "--etcd-endpoints=x,y",
        "--etcd-endpoints=z",
    ]);
    assert_eq!(f.etcd_prefix, "/b");
    assert_eq!(f.etcd_endpoints.0, ["z"]);
    // Go's strings.Split: no trimming, empty items kept.
    assert_eq!(run(&["--etcd-endpoints=a, b,"]).etcd_endpoints.0, ["a", " b", ""]);
}

#[test]
fn renew_margin_range() {
    assert_eq!(run(&["--subnet-lease-renew-margin=1"]).subnet_lease_renew_margin, 1);
    assert_eq!(
        run(&["--subnet-lease-renew-margin=1439"]).subnet_lease_renew_margin,
        1439
    );
    for bad in ["0", "1440", "-5"] {
        let e = err(&[&format!("--subnet-lease-renew-margin={bad}")]);
        assert!(matches!(e, FlagsError::RenewMarginOutOfRange { .. }), "{bad}: {e:?}");
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string()
                .starts_with("Invalid subnet-lease-renew-margin option, out of acceptable range"),
            "{e}"
        );
    }
    let e = err_with(&[], &env(&[("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "2000")]));
    assert_eq!(e, FlagsError::RenewMarginOutOfRange { minutes: 2000 });
}

#[test]
fn go_integer_literals() {
    use super::goflag::parse_go_int;
    assert_eq!(parse_go_int("42"), Ok(42));
    assert_eq!(parse_go_int("+42"), Ok(42));
    assert_eq!(parse_go_int("-42"), Ok(-42));
    assert_eq!(parse_go_int("010"), Ok(8));
    assert_eq!(parse_go_int("0x1F"), Ok(31));
    assert_eq!(parse_go_int("0o17"), Ok(15));
    assert_eq!(parse_go_int("-0b11"), Ok(-3));
    assert_eq!(parse_go_int("1_000"), Ok(1000));
    assert_eq!(parse_go_int("0x_1f"), Ok(31));
    assert_eq!(parse_go_int("0"), Ok(0));
    for bad in ["", "-", "_1", "1_", "1__0", "0x", "12a", "--1", "+-1", "08", " 1"] {
        assert!(parse_go_int(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        parse_go_int("99999999999999999999"),
        Err("value out of range".to_owned())
    );
    assert_eq!(run(&["--healthz-port=010"]).healthz_port, 8);
}

#[test]
fn bad_values_name_the_flag_and_the_value() {
    let e = err(&["--healthz-port=abc"]);
    assert!(matches!(&e, FlagsError::InvalidValue { name, value, .. } if name == "healthz-port" && value == "abc"));
    assert!(
        e.to_string()
            .starts_with("invalid value \"abc\" for flag -healthz-port: "),
        "{e}"
    );
    assert!(matches!(
        err(&["--healthz-port=70000"]),
        FlagsError::InvalidValue { .. }
    ));
    assert!(matches!(err(&["--iptables-resync=0"]), FlagsError::InvalidValue { .. }));
    assert!(matches!(err(&["--log-format=xml"]), FlagsError::InvalidValue { .. }));
    let e = err_with(&[], &env(&[("FLANNELD_IP_MASQ", "yes")]));
    assert!(matches!(&e, FlagsError::InvalidEnv { var, value, .. } if var == "FLANNELD_IP_MASQ" && value == "yes"));
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn syntax_errors_exit_2_with_gos_words() {
    let cases: [(&[&str], FlagsError, &str); 6] = [
        (
            &["--no-such-flag=1"],
            FlagsError::Unknown {
                name: "no-such-flag".into(),
            },
            "flag provided but not defined: -no-such-flag",
        ),
        (
            &["-iface"],
            FlagsError::MissingValue { name: "iface".into() },
            "flag needs an argument: -iface",
        ),
        (
            &["---iface=x"],
            FlagsError::BadSyntax {
                token: "---iface=x".into(),
            },
            "bad flag syntax: ---iface=x",
        ),
        (
            &["-=x"],
            FlagsError::BadSyntax { token: "-=x".into() },
            "bad flag syntax: -=x",
        ),
        (
            &["eth0"],
            FlagsError::Positional { arg: "eth0".into() },
            "unexpected argument \"eth0\": flanneld takes no positional arguments",
        ),
        (
            &["--", "x"],
            FlagsError::Positional { arg: "x".into() },
            "unexpected argument \"x\": flanneld takes no positional arguments",
        ),
    ];
    for (args, want, text) in cases {
        let e = err(args);
        assert_eq!(e, want, "{args:?}");
        assert_eq!(e.to_string(), text);
        assert_eq!(e.exit_code(), 2);
    }
    // A trailing "--" ends the flags and is fine.
    assert!(run(&["--ip-masq", "--"]).ip_masq);
}

#[test]
fn version_ignores_environment() {
    let argv = |a: &[&'static str]| std::iter::once("flanneld").chain(a.iter().copied()).collect::<Vec<_>>();
    assert_eq!(parse_from(argv(&["--version"]), &no_env()), Ok(Invocation::Version));
    assert_eq!(parse_from(argv(&["-version"]), &no_env()), Ok(Invocation::Version));
    // Upstream's quirk, kept: FLANNELD_VERSION has no effect.
    let e = env(&[("FLANNELD_VERSION", "true")]);
    assert!(matches!(parse_from(argv(&[]), &e), Ok(Invocation::Run(f)) if !f.version));
    assert!(matches!(
        parse_from(argv(&["--version=false"]), &no_env()),
        Ok(Invocation::Run(_))
    ));
}

#[test]
fn help_prints_go_style_usage() {
    for h in ["-h", "--help", "-help", "--h"] {
        let Ok(Invocation::Help(text)) = parse_from(["flanneld", h], &no_env()) else {
            panic!("{h}: expected Help");
        };
        assert!(text.starts_with("Usage: flanneld [OPTION]...\n"), "{text}");
    }
    let text = usage();
    for want in [
        "  -etcd-prefix string\n    \tetcd prefix (default \"/coreos.com/network\")\n",
        "  -ip-masq\n    \tsetup IP masquerade rule for traffic destined outside of overlay network\n",
        "  -iptables-forward-rules\n    \tadd default accept rules to FORWARD chain in iptables (default true)\n",
        concat!(
            "  -subnet-lease-renew-margin int\n",
            "    \tsubnet lease renewal margin, in minutes, ranging from 1 to 1439 (default 60)\n"
        ),
        "  -healthz-port int\n    \tthe port for healthz server to listen(0 to disable)\n",
        "  -kube-subnet-mgr\n    \tcontact the Kubernetes API for subnet assignment instead of etcd.\n",
        "  -v value\n    \tnumber for the log level verbosity\n",
        "  -bpf-pin-dir string\n    \tflannel-rs addition: ",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // Sorted by name, as Go's PrintDefaults.
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("  -")).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names.len(), 37, "{names:?}");
    // An error before -h wins, as in Go.
    assert!(matches!(err(&["--nope", "-h"]), FlagsError::Unknown { .. }));
}

#[test]
fn env_names_follow_upstreams_rule() {
    let vars = env_vars();
    for arg in Flags::command().get_arguments() {
        let long = arg.get_long().unwrap();
        let var = vars.iter().find(|(name, _)| name == long).map(|(_, v)| v.as_str());
        if long == "version" {
            assert_eq!(var, None);
        } else {
            assert_eq!(var, Some(env_name(long).as_str()), "{long}");
        }
    }
    assert_eq!(env_name("log_backtrace_at"), "FLANNELD_LOG_BACKTRACE_AT");
    assert_eq!(env_name("a.b-c"), "FLANNELD_A_B_C");
}

#[test]
fn password_is_never_logged() {
    let f = run(&["--etcd-password=hunter2", "--etcd-username=root"]);
    assert_eq!(f.etcd_password.expose(), "hunter2");
    let line = f.redacted_debug();
    assert!(!line.contains("hunter2"), "{line}");
    assert!(line.contains("etcd_password: <redacted>"), "{line}");
    assert!(line.contains("etcd_username: \"root\""), "{line}");
    assert!(!format!("{f:?}").contains("hunter2"));
    let f = run_with(&[], &env(&[("FLANNELD_ETCD_PASSWORD", "s3cret")]));
    assert_eq!(f.etcd_password.expose(), "s3cret");
    assert!(!f.redacted_debug().contains("s3cret"));
    assert!(run(&[]).redacted_debug().contains("etcd_password: \"\""));
}
