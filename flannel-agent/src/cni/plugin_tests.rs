//! The commands end to end, with fake delegates (shell scripts) in a temporary CNI_PATH:
//! what the delegate is given, what is saved, printed and removed.

use std::path::{Path, PathBuf};

use super::*;
use crate::cni::exec::tests::script;

const V4: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

/// A temporary node: a CNI_PATH with a fake `bridge` that logs its command and stdin to
/// `calls` and answers in the version it was given, a subnet file and a data directory.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        script(
            &dir.path().join("bin"),
            "bridge",
            r#"conf=$(cat); log="$(dirname "$0")/../calls"
echo "$CNI_COMMAND $CNI_CONTAINERID $conf" >> "$log"
if [ "$CNI_COMMAND" = ADD ]; then
  v=$(printf '%s' "$conf" | sed 's/.*"cniVersion":"\([^"]*\)".*/\1/')
  printf '{"cniVersion":"%s","ips":[{"address":"10.244.1.2/24","gateway":"10.244.1.1"}]}' "$v"
fi"#,
        );
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conf(&self, version: &str, extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"cbr0","type":"flannel","subnetFile":"{}","dataDir":"{}",
                "delegate":{{"hairpinMode":true,"isDefaultGateway":true}},"subnetFileWaitSeconds":0.2{extra}}}"#,
            self.path("subnet.env").display(),
            self.path("data").display()
        )
    }

    fn call(&self, command: &str, stdin: &str) -> Reply {
        let env: HashMap<String, String> = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "ctr1"),
            ("CNI_NETNS", "/run/netns/ctr1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", &self.path("bin").display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        handle(&env, stdin.as_bytes())
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn saved(path: &Path) -> Option<Value> {
    std::fs::read(path).ok().map(|b| serde_json::from_slice(&b).unwrap())
}

#[test]
fn add_check_del() {
    let node = Node::new();
    std::fs::write(node.path("subnet.env"), V4).unwrap();
    let add = node.call("ADD", &node.conf("1.0.0", ""));
    assert!(add.success, "{add:?}");
    assert_eq!(add.stdout.unwrap()["ips"][0]["address"], "10.244.1.2/24");
    let config = saved(&node.path("data/ctr1")).expect("ADD saves the delegate config");
    assert_eq!(config["name"], "cbr0");
    assert_eq!(config["ipam"]["ranges"], json!([[{"subnet": "10.244.1.0/24"}]]));
    assert!(node.calls()[0].starts_with("ADD ctr1 {\"cniVersion\":\"1.0.0\""));

    let prev = r#","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.2/24"}]}"#;
    let check = node.call("CHECK", &node.conf("1.0.0", prev));
    assert_eq!(
        check,
        Reply {
            stdout: None,
            success: true
        }
    );
    assert!(
        node.calls()[1].contains(r#""prevResult":{"cniVersion":"1.0.0""#),
        "{:?}",
        node.calls()
    );

    // DEL works from the saved config even with subnet.env gone, and twice.
    std::fs::remove_file(node.path("subnet.env")).unwrap();
    assert!(node.call("DEL", &node.conf("1.0.0", "")).success);
    assert!(saved(&node.path("data/ctr1")).is_none(), "DEL removes the saved config");
    assert!(node.call("DEL", &node.conf("1.0.0", "")).success);
    assert_eq!(node.calls().len(), 3, "the second DEL has nothing to delegate");
    let check = node.call("CHECK", &node.conf("1.0.0", ""));
    assert_eq!(check.stdout.unwrap()["code"], 3);
}

#[test]
fn add_without_subnet_env_waits_then_fails_clearly() {
    let node = Node::new();
    let reply = node.call("ADD", &node.conf("0.3.1", ""));
    assert!(!reply.success);
    let error = reply.stdout.unwrap();
    assert_eq!(error["cniVersion"], "0.3.1");
    assert_eq!(error["code"], 11);
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("Check that flanneld is running"),
        "{error}"
    );
    assert!(node.calls().is_empty());
}

#[test]
fn malformed_stdin_is_code_7() {
    let node = Node::new();
    let delegate_with_name = r#"{"cniVersion":"0.4.0","delegate":{"name":"x"}}"#;
    for stdin in ["", "{", "[]", "null", delegate_with_name] {
        let reply = node.call("ADD", stdin);
        assert!(!reply.success);
        let error = reply.stdout.unwrap();
        assert_eq!(error["code"], 7, "{stdin}: {error}");
        // The request's version when it has a usable one, else the latest.
        let version = if stdin == delegate_with_name {
            "0.4.0"
        } else {
            LATEST_VERSION
        };
        assert_eq!(error["cniVersion"], version);
    }
}

#[test]
fn version_status_and_version_gates() {
    let node = Node::new();
    let version = node.call("VERSION", "");
    assert_eq!(
        version.stdout.unwrap(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    let status = node.call("STATUS", &node.conf("1.1.0", ""));
    assert_eq!(status.stdout.unwrap()["code"], 50);
    std::fs::write(node.path("subnet.env"), V4).unwrap();
    assert!(node.call("STATUS", &node.conf("1.1.0", "")).success);
    assert_eq!(node.call("STATUS", &node.conf("1.0.0", "")).stdout.unwrap()["code"], 1);
    assert_eq!(node.call("CHECK", &node.conf("0.3.1", "")).stdout.unwrap()["code"], 1);
    assert!(node.call("GC", &node.conf("1.1.0", "")).success);
}

#[test]
fn a_failed_add_keeps_the_config_for_the_del_that_follows() {
    let node = Node::new();
    std::fs::write(node.path("subnet.env"), V4).unwrap();
    let conf = node
        .conf("1.0.0", "")
        .replace(r#""hairpinMode":true"#, r#""type":"macvlan""#);
    let reply = node.call("ADD", &conf);
    let error = reply.stdout.unwrap();
    assert_eq!(
        error["msg"],
        format!("failed to find plugin \"macvlan\" in path {:?}", node.path("bin"))
    );
    assert_eq!(saved(&node.path("data/ctr1")).unwrap()["type"], "macvlan");
}
