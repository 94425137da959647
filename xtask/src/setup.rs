//! `cargo xtask setup`: installs what building and testing flannel-rs needs on a Debian 12
//! machine: Debian packages, rustup components, and bpf-linker built against the nightly's
//! own LLVM (see shared/notes/ebpf-toolchain.md for why it is built that way).
//!
//! Every step checks before it acts, and the checks are cheap (dpkg-query, rustup, running
//! `bpf-linker --version`), so a second run only prints that everything is there.

use std::{
    collections::HashSet,
    env, fs,
    os::unix::fs::{symlink, MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::ebpf::{self, BPF_LINKER_VERSION, TOOLCHAIN};

/// Debian packages the build, the tests, the demo and the benchmarks use.
const DEBIAN_PACKAGES: [&str; 14] = [
    "etcd-server",
    "etcd-client",
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "iperf3",
    "sockperf",
    "tcpdump",
    "containernetworking-plugins",
    // etcd-client (the crate) runs protoc in its build script.
    "protobuf-compiler",
    "ethtool",
    "iputils-ping",
    "procps",
];

/// Components of the nightly toolchain: rust-src for `-Z build-std=core`, clippy to lint
/// the eBPF crate.
const NIGHTLY_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];

/// Components of the host toolchain that `cargo xtask test` runs.
const HOST_COMPONENTS: [&str; 2] = ["rustfmt", "clippy"];

/// Installs whatever is missing and prints one line per thing it installs.
pub fn run() -> Result<()> {
    let started = Instant::now();
    let mut installed = 0;
    installed += debian_packages()?;
    installed += nightly_toolchain()?;
    installed += rust_components(Some(TOOLCHAIN), &NIGHTLY_COMPONENTS)?;
    installed += rust_components(None, &HOST_COMPONENTS)?;
    installed += bpf_linker()?;
    let elapsed = started.elapsed().as_secs_f64();
    if installed == 0 {
        println!("setup: everything is already installed ({elapsed:.1}s)");
    } else {
        println!("setup: installed {installed} item(s) in {elapsed:.0}s");
    }
    Ok(())
}

/// Installs the missing Debian packages; returns how many it installed.
fn debian_packages() -> Result<usize> {
    let missing = missing_debian_packages()?;
    if missing.is_empty() {
        return Ok(0);
    }
    for package in &missing {
        println!("setup: installing Debian package {package}");
    }
    let apt = |args: &[&str]| {
        let mut cmd = privileged("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    // Only now: `apt-get update` is the slow part, and a fresh machine's lists may be empty.
    ebpf::run(apt(&["update", "-q"]), "apt-get update")?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    ebpf::run(install, "installing Debian packages")?;
    let still_missing = missing_debian_packages()?;
    if !still_missing.is_empty() {
        bail!("apt-get did not install {}", still_missing.join(" "));
    }
    Ok(missing.len())
}

fn missing_debian_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when a package is unknown to dpkg, and prints nothing for it on
    // stdout: the status column is the only thing to trust.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\\n"])
        .args(DEBIAN_PACKAGES)
        .output()
        .context("running dpkg-query (setup supports Debian machines only)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed = installed_packages(&stdout);
    Ok(DEBIAN_PACKAGES
        .into_iter()
        .filter(|package| !installed.contains(package))
        .collect())
}

/// The packages that `dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n'` reports as
/// installed ("ii"; "rc" is removed with its config files left, "un" unknown).
fn installed_packages(dpkg_query_output: &str) -> HashSet<&str> {
    dpkg_query_output
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once(' ')?;
            status.starts_with("ii").then_some(name)
        })
        .collect()
}

/// Runs `program` directly as root, through sudo otherwise.
fn privileged(program: &str) -> Command {
    let is_root = fs::metadata("/proc/self").map(|meta| meta.uid() == 0).unwrap_or(false);
    if is_root {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg(program);
        cmd
    }
}

/// Makes sure the `nightly` toolchain exists; machines come with it, but try to install it
/// if not, since nothing eBPF builds without it.
fn nightly_toolchain() -> Result<usize> {
    let has_nightly = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .is_ok_and(|out| out.status.success());
    if has_nightly {
        return Ok(0);
    }
    println!("setup: installing the {TOOLCHAIN} Rust toolchain");
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", TOOLCHAIN, "--profile", "minimal"]);
    ebpf::run(cmd, "installing the nightly toolchain (needed for -Z build-std)")?;
    Ok(1)
}

/// Adds the `components` missing from `toolchain` (the active toolchain when `None`).
fn rust_components(toolchain: Option<&str>, components: &[&str]) -> Result<usize> {
    let toolchain_args = |cmd: &mut Command| {
        if let Some(toolchain) = toolchain {
            cmd.args(["--toolchain", toolchain]);
        }
    };
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--installed"]);
    toolchain_args(&mut list);
    let out = list.output().context("running `rustup component list`")?;
    if !out.status.success() {
        bail!(
            "`rustup component list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = components
        .iter()
        .copied()
        .filter(|component| !has_component(&stdout, component))
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let which = toolchain.unwrap_or("the active toolchain");
    for component in &missing {
        println!("setup: installing rustup component {component} for {which}");
    }
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    toolchain_args(&mut add);
    ebpf::run(add, "rustup component add")?;
    Ok(missing.len())
}

/// Whether `rustup component list --installed` output lists `component`. Lines are
/// "rust-src", or "clippy-x86_64-unknown-linux-gnu" for per-target components.
/// (A prefix match: fine for the components we ask for, none of which is another's prefix.)
fn has_component(list: &str, component: &str) -> bool {
    list.lines()
        .any(|line| line == component || line.strip_prefix(component).is_some_and(|rest| rest.starts_with('-')))
}

/// Builds and installs bpf-linker into `$CARGO_HOME/bin` unless the one there is the right
/// version and was built against the current nightly's libLLVM.
fn bpf_linker() -> Result<usize> {
    let cargo_bin = ebpf::cargo_bin_dir().context("neither CARGO_HOME nor HOME is set")?;
    let installed = cargo_bin.join("bpf-linker");
    let llvm = NightlyLlvm::find()?;
    let prefix = llvm_prefix()?;
    let stamp_path = prefix.join("bpf-linker.stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} {}\n", llvm.library.display());

    // The binary rpaths to `prefix/lib`, whose symlink names the nightly's libLLVM: after a
    // nightly update the old library is gone and `--version` fails to start, and the stamp
    // catches the case where it is still there but no longer the nightly's.
    let up_to_date = ebpf::bpf_linker_version(&installed).as_deref() == Some(BPF_LINKER_VERSION)
        && fs::read_to_string(&stamp_path).is_ok_and(|found| found == stamp);
    if up_to_date {
        return Ok(0);
    }

    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} into {} (built against the nightly's LLVM {}; takes a few minutes)",
        cargo_bin.display(),
        llvm.major
    );
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let file_name = llvm.library.file_name().context("libLLVM path has no file name")?;
    for link in [lib_dir.join("libLLVM.so"), lib_dir.join(file_name)] {
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("removing {}", link.display())),
        }
        symlink(&llvm.library, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    let cargo_home = cargo_bin.parent().context("$CARGO_HOME/bin has no parent")?;
    let mut install = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", llvm.major))
        .arg("--root")
        .arg(cargo_home)
        .env("LLVM_PREFIX", &prefix);
    ebpf::run(install, "building bpf-linker")?;
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    if ebpf::bpf_linker_version(&installed).as_deref() != Some(BPF_LINKER_VERSION) {
        bail!("{} does not run after installing it", installed.display());
    }
    Ok(1)
}

/// Where the LLVM prefix for bpf-linker lives: outside target/ so `cargo clean` keeps it,
/// since the installed binary loads libLLVM through it.
fn llvm_prefix() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/flannel-rs/llvm"))
}

/// The shared libLLVM the nightly toolchain ships, which exports the LLVM C API bpf-linker
/// needs. Debian 12 has no LLVM of the nightly's major version.
struct NightlyLlvm {
    /// e.g. `<sysroot>/lib/libLLVM.so.22.1-rust-1.97.0-nightly`.
    library: PathBuf,
    /// LLVM major version, which selects bpf-linker's `llvm-N` feature.
    major: String,
}

impl NightlyLlvm {
    fn find() -> Result<Self> {
        let out = Command::new("rustup")
            .args(["run", TOOLCHAIN, "rustc", "-vV"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .context("running `rustc +nightly -vV`")?;
        if !out.status.success() {
            bail!("`rustc +{TOOLCHAIN} -vV` failed");
        }
        let major = llvm_major(&String::from_utf8_lossy(&out.stdout))
            .context("`rustc +nightly -vV` prints no LLVM version")?
            .to_owned();

        let out = Command::new("rustup")
            .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .context("running `rustc +nightly --print sysroot`")?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let lib_dir = sysroot.join("lib");
        // The versioned name (libLLVM.so.22.1-rust-…), as in the notes: it is the library's
        // soname, so the linker records it and the rpath lookup finds our symlink.
        let library = fs::read_dir(&lib_dir)
            .with_context(|| format!("reading {}", lib_dir.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .find(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
            })
            .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
        Ok(Self { library, major })
    }
}

/// The LLVM major version in `rustc -vV` output ("LLVM version: 22.1.4" gives "22").
fn llvm_major(rustc_vv: &str) -> Option<&str> {
    rustc_vv
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|llvm| llvm.split('.').next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fully_installed_packages_count() {
        let out = "bpftool ii \netcd-server rc \niperf3 un \n";
        assert_eq!(installed_packages(out), HashSet::from(["bpftool"]));
    }

    #[test]
    fn components_match_with_or_without_a_target_suffix() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        assert!(has_component(list, "rust-src"));
        assert!(has_component(list, "cargo"));
        assert!(!has_component(list, "clippy"));
    }

    #[test]
    fn llvm_major_comes_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some("22"));
        assert_eq!(llvm_major("rustc 1.0"), None);
    }
}
