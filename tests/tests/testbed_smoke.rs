//! Privileged tests of the testbed itself, without flanneld where possible: if these fail,
//! no test built on the testbed can be trusted.
//!
//! They need root (network namespaces); outside CI they skip loudly without it.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flannel_tests::testbed::cluster::{FABRIC_IP, OUTSIDE_IP};
use flannel_tests::testbed::cni::SubnetEnv;
use flannel_tests::testbed::netns::{self, in_netns_blocking};
use flannel_tests::testbed::{cleanup_stale, probe, require_root, Testbed, TestbedOptions, NAME_PREFIX};

const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

/// What flanneld would write on node `n` with `--ip-masq` (so the bridge plugin does not
/// masquerade).
fn fake_subnet_env(n: u8) -> String {
    format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{n}.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n")
}

/// Namespaces and state directories still carrying `prefix`.
fn leftovers(prefix: &str) -> Vec<String> {
    let own = format!("{prefix}-");
    let mut found: Vec<String> = netns::list().into_iter().filter(|n| n.starts_with(&own)).collect();
    let dir = std::env::temp_dir().join("flannel-rs-testbed").join(prefix);
    if dir.exists() {
        found.push(dir.display().to_string());
    }
    found
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[tokio::test]
async fn two_nodes_with_host_gw_routes_by_hand_have_full_connectivity() -> anyhow::Result<()> {
    if !require_root("two_nodes_with_host_gw_routes_by_hand_have_full_connectivity") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(NET_CONF)).await?;
    let prefix = tb.prefix().to_owned();
    eprintln!("testbed {prefix} up in {:?}", started.elapsed());

    // etcd runs in the fabric: the harness reaches it through its forwarder, the nodes
    // directly at the fabric address.
    let etcd = tb.etcd().context("etcd")?;
    assert_eq!(etcd.get(&tb.config_key()).await?.as_deref(), Some(NET_CONF));
    assert_eq!(tb.etcd_endpoint()?, format!("http://{FABRIC_IP}:2379"));
    let (status, body) = probe::http_get(&tb.node(2).netns, (FABRIC_IP, 2379).into(), "/version").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("etcdserver"), "{body}");

    for (n, other) in [(1u8, 2u8), (2, 1)] {
        tb.write_subnet_env(n.into(), &fake_subnet_env(n))?;
        // host-gw, by hand: the other node's pod subnet via its underlay address.
        let node_ns = tb.node(n.into()).netns.clone();
        let via = tb.node(other.into()).ip.to_string();
        tb.ip(
            &node_ns,
            &["route", "add", &format!("10.244.{other}.0/24"), "via", &via],
        )
        .await?;
        tb.sysctl(&node_ns, "net.ipv4.ip_forward", "1").await?;
    }
    let mut pods = Vec::new();
    for (node, name) in [(1, "a1"), (1, "a2"), (2, "b1"), (2, "b2")] {
        pods.push(tb.add_pod(node, name).await?);
    }
    for pod in &pods {
        let subnet: ipnet::IpNet = format!("10.244.{}.0/24", pod.node).parse()?;
        assert!(
            subnet.contains(&pod.ip()),
            "{} got {} on node {}",
            pod.name,
            pod.ip(),
            pod.node
        );
    }
    eprintln!("pods up after {:?}", started.elapsed());

    let matrix = tb.connectivity_matrix(&pods).await;
    eprintln!("{matrix}");
    matrix.assert_full();
    eprintln!("matrix done after {:?}", started.elapsed());

    // The fabric routes between the node segment and the outside one.
    assert!(probe::ping(&tb.node(1).netns, IpAddr::V4(OUTSIDE_IP)).await);
    // Pods are not masqueraded here, and the outside has no route back to them.
    assert!(!probe::ping_attempts(&pods[0].netns, IpAddr::V4(OUTSIDE_IP), 1).await);

    tb.remove_pod("a2").await?;
    assert!(tb.pod("a2").is_none());
    assert!(!netns::list().contains(&pods[1].netns));

    drop(tb);
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    eprintln!("torn down after {:?}", started.elapsed());
    Ok(())
}

#[test]
fn a_testbed_dropped_during_a_panic_leaves_nothing_behind() {
    if !require_root("a_testbed_dropped_during_a_panic_leaves_nothing_behind") {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut tb = Testbed::start(TestbedOptions::new(1)).await.unwrap();
            tb.write_subnet_env(1, &fake_subnet_env(1)).unwrap();
            tb.add_pod(1, "doomed").await.unwrap();
            let etcd_pid = tb.etcd().and_then(|e| e.pid()).unwrap();
            tx.send((tb.prefix().to_owned(), etcd_pid)).unwrap();
            panic!("deliberate panic with a live testbed");
        })
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (prefix, etcd_pid) = rx.recv().expect("the testbed was built before the panic");
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    assert!(!pid_alive(etcd_pid), "etcd (pid {etcd_pid}) survived the testbed");
}

/// Env var that turns [`sigint_child`] from a no-op into the child of
/// [`ctrl_c_removes_the_testbeds_of_the_process`].
const SIGINT_CHILD: &str = "FLANNEL_TESTBED_SIGINT_CHILD";

/// Not a test on its own: run by the test below in a child process, which it interrupts.
#[tokio::test]
#[ignore = "run as a child process by ctrl_c_removes_the_testbeds_of_the_process"]
async fn sigint_child() -> anyhow::Result<()> {
    if std::env::var_os(SIGINT_CHILD).is_none() {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(1)).await?;
    tb.write_subnet_env(1, &fake_subnet_env(1))?;
    tb.add_pod(1, "p").await?;
    let sleeper = tb.spawn(&tb.node(1).netns, "sleeper", "sleep", &["300"])?;
    println!("READY {} {}", tb.prefix(), sleeper.id());
    tokio::time::sleep(Duration::from_secs(60)).await;
    anyhow::bail!("was not interrupted")
}

#[test]
fn ctrl_c_removes_the_testbeds_of_the_process() -> anyhow::Result<()> {
    if !require_root("ctrl_c_removes_the_testbeds_of_the_process") {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "sigint_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SIGINT_CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read on a thread so that a child that never gets ready cannot hang the test.
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints `test sigint_child ... ` on the same line first.
            if let Some((_, rest)) = line.split_once("READY ") {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let ready = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => line,
        Err(_) => {
            child.kill()?;
            let out = child.wait_with_output()?;
            anyhow::bail!("child never got ready: {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    let mut fields = ready.split_whitespace();
    let prefix = fields.next().context("prefix")?.to_owned();
    let sleeper: u32 = fields.next().context("pid")?.parse()?;
    assert!(!leftovers(&prefix).is_empty());

    // SAFETY: kill(2) on the pid of our own child, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            anyhow::bail!("the child did not exit within 30 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status}");
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    // Killed either by the cleanup (it ran in a node namespace) or by its parent-death signal.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(sleeper) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_alive(sleeper), "a process of the testbed survived");
    Ok(())
}

#[tokio::test]
async fn cleanup_stale_removes_what_dead_runs_left() -> anyhow::Result<()> {
    if !require_root("cleanup_stale_removes_what_dead_runs_left") {
        return Ok(());
    }
    // A pid that certainly belongs to no live process: a child we started and reaped.
    let dead = Command::new("true").spawn()?;
    let dead_pid = dead.id();
    let _ = dead.wait_with_output()?;
    // A family of its own, so that the cleanup of other test binaries running at the same
    // time (which clean the `fl` family) cannot get there first.
    let family = "fltest";
    let stale = format!("{family}{dead_pid}-0");
    let live = format!("{family}{}-999", std::process::id());
    for name in [format!("{stale}-fabric"), format!("{stale}-n1"), format!("{live}-n1")] {
        netns::add(&name).await?;
    }
    let stale_dir: PathBuf = std::env::temp_dir().join("flannel-rs-testbed").join(&stale);
    std::fs::create_dir_all(stale_dir.join("n1"))?;
    // A killed run also leaves its bpffs mounted.
    let bpffs = stale_dir.join("bpffs");
    std::fs::create_dir_all(&bpffs)?;
    let bpffs_str = bpffs.to_str().context("UTF-8 path")?;
    netns::run_blocking("mount", &["-t", "bpf", "bpf", bpffs_str], Duration::from_secs(10))?;

    // The `fl` family's cleanup leaves names that merely start with `fl` alone.
    cleanup_stale(NAME_PREFIX);
    let untouched = leftovers(&stale);
    let cleaned = cleanup_stale(family);
    let live_left = leftovers(&live);
    // Our own (live) namespace must survive; remove it before asserting, so that a failed
    // assertion leaks nothing.
    netns::run_blocking(
        "ip",
        &["netns", "delete", &format!("{live}-n1")],
        Duration::from_secs(10),
    )?;
    assert_eq!(untouched.len(), 3, "{untouched:?}");
    assert!(cleaned.contains(&stale), "{cleaned:?}");
    assert_eq!(leftovers(&stale), Vec::<String>::new());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!mounts.contains(bpffs_str), "the stale bpffs is still mounted");
    assert_eq!(live_left, vec![format!("{live}-n1")]);
    Ok(())
}

#[tokio::test]
async fn tls_etcd_in_the_fabric_serves_the_harness_and_the_nodes() -> anyhow::Result<()> {
    if !require_root("tls_etcd_in_the_fabric_serves_the_harness_and_the_nodes") {
        return Ok(());
    }
    let tb = Testbed::start(TestbedOptions::new(1).etcd_tls().net_conf(NET_CONF)).await?;
    let etcd = tb.etcd().context("etcd")?;
    // Through the forwarder: the certificate is valid for 127.0.0.1.
    assert_eq!(etcd.get(&tb.config_key()).await?.as_deref(), Some(NET_CONF));

    // From a node, as an agent would connect: the certificate must be valid for the fabric
    // address. A runtime on a thread inside the node namespace opens its sockets there.
    let endpoint = tb.etcd_endpoint()?;
    assert!(endpoint.starts_with("https://198.18.0.254:"), "{endpoint}");
    let options = etcd.connect_options()?;
    let key = tb.config_key();
    let value = in_netns_blocking(&tb.node(1).netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let connect = etcd_client::Client::connect([endpoint.as_str()], Some(options));
            let mut client = tokio::time::timeout(Duration::from_secs(10), connect).await??;
            let got = tokio::time::timeout(Duration::from_secs(10), client.get(key, None)).await??;
            anyhow::Ok(
                got.kvs()
                    .first()
                    .map(|kv| kv.value_str().map(str::to_owned))
                    .transpose()?,
            )
        })
    })?;
    assert_eq!(value.as_deref(), Some(NET_CONF));
    Ok(())
}

#[tokio::test]
async fn agents_get_ready_and_keep_their_subnet_across_a_crash() -> anyhow::Result<()> {
    if !require_root("agents_get_ready_and_keep_their_subnet_across_a_crash") {
        return Ok(());
    }
    // The "none" backend programs nothing: this is about the testbed's agent handling, not
    // about a datapath.
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"none"}}"#;
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(conf)).await?;
    let started = Instant::now();
    for n in 1..=2 {
        tb.start_agent(n, &[]).await?;
    }
    for n in 1..=2 {
        tb.wait_ready(n, Duration::from_secs(30)).await?;
    }
    eprintln!("two agents ready in {:?}", started.elapsed());
    let subnet = |tb: &Testbed, n| -> anyhow::Result<ipnet::IpNet> {
        let env = SubnetEnv::parse(&tb.read_subnet_env(n)?)?;
        env.subnet.context("FLANNEL_SUBNET")
    };
    let (first, second) = (subnet(&tb, 1)?, subnet(&tb, 2)?);
    assert_ne!(first, second);
    let leases = tb
        .etcd()
        .context("etcd")?
        .get_prefix("/coreos.com/network/subnets/")
        .await?;
    assert_eq!(leases.len(), 2, "{leases:?}");

    // A crash and a restart: same subnet, read back from subnet.env and the lease.
    tb.kill_agent(1)?;
    tb.restart_agent(1).await?;
    tb.wait_ready(1, Duration::from_secs(30)).await?;
    assert_eq!(subnet(&tb, 1)?, first);
    assert!(tb.agent_logs(1)?.contains("flanneld starting"));

    // The subnet.env an agent wrote is what the CNI code path consumes.
    let pod = tb.add_pod(1, "a").await?;
    assert!(first.contains(&pod.ip()), "{} not in {first}", pod.ip());
    tb.shutdown().await
}

#[tokio::test]
async fn dual_stack_pods_with_routes_by_hand_have_full_connectivity() -> anyhow::Result<()> {
    if !require_root("dual_stack_pods_with_routes_by_hand_have_full_connectivity") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(2).without_etcd()).await?;
    for (n, other) in [(1usize, 2usize), (2, 1)] {
        let env = format!(
            "{}FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:{n}::1/64\n",
            fake_subnet_env(n as u8)
        );
        tb.write_subnet_env(n, &env)?;
        let node_ns = tb.node(n).netns.clone();
        let (via, via6) = (tb.node(other).ip.to_string(), tb.node(other).ipv6.to_string());
        tb.ip(
            &node_ns,
            &["route", "add", &format!("10.244.{other}.0/24"), "via", &via],
        )
        .await?;
        tb.ip(
            &node_ns,
            &["-6", "route", "add", &format!("fd00:10:244:{other}::/64"), "via", &via6],
        )
        .await?;
        tb.sysctl(&node_ns, "net.ipv4.ip_forward", "1").await?;
        tb.sysctl(&node_ns, "net.ipv6.conf.all.forwarding", "1").await?;
    }
    let a = tb.add_pod(1, "a").await?;
    let b = tb.add_pod(2, "b").await?;
    eprintln!("dual-stack pods up after {:?}", started.elapsed());
    let v4 = tb.connectivity_matrix(&[a.clone(), b.clone()]).await;
    let v6 = [a.endpoint_v6(), b.endpoint_v6()]
        .into_iter()
        .collect::<Option<Vec<_>>>();
    let v6 = probe::Matrix::probe(&v6.context("both pods have an IPv6 address")?).await;
    eprintln!("{v4}\n{v6}");
    v4.assert_full();
    v6.assert_full();
    eprintln!("dual stack done after {:?}", started.elapsed());
    Ok(())
}
