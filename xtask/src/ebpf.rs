//! How the eBPF object is built: the toolchain checks and the one cargo command.
//!
//! `flannel-agent/build.rs` includes this file with `#[path]`, so the object the agent embeds
//! and the one `cargo xtask build-ebpf` prints are built by the same code. It therefore uses
//! only std and anyhow, the dependencies both sides have.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Target triple of the eBPF object (little-endian BPF, like every host we run on).
pub const TARGET: &str = "bpfel-unknown-none";
/// The rustup toolchain that builds it: `-Z build-std` needs nightly, and it must be this
/// exact name since a fresh machine has `nightly` and rustup will not fetch another.
pub const TOOLCHAIN: &str = "nightly";
/// Name of the eBPF crate's binary, i.e. of the object file cargo writes.
pub const BIN: &str = "flannel-ebpf";
/// Version of bpf-linker that `cargo xtask setup` installs and the build expects.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The programs the eBPF build needs, found and checked by [`Tools::find`].
pub struct Tools {
    /// rustup, which runs cargo from the nightly toolchain.
    pub rustup: PathBuf,
    /// The bpf-linker binary (rustc links BPF objects with it, found through PATH).
    pub bpf_linker: PathBuf,
}

impl Tools {
    /// Finds rustup, the nightly toolchain with rust-src, and a working bpf-linker.
    ///
    /// Each error is one line that says what is missing and to run `cargo xtask setup`, since
    /// that is what a developer on a fresh machine needs to read.
    pub fn find() -> Result<Self> {
        const HINT: &str = "run `cargo xtask setup`";
        let Some(rustup) = find_program("rustup") else {
            bail!("rustup not found on PATH nor in $CARGO_HOME/bin; the eBPF build runs the `{TOOLCHAIN}` toolchain through it");
        };
        let sysroot = Command::new(&rustup)
            .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        let Some(sysroot) = sysroot else {
            bail!("the `{TOOLCHAIN}` Rust toolchain is not installed (the eBPF build needs it): {HINT}");
        };
        if !rust_src_dir(&sysroot).join("core").is_dir() {
            bail!("rust-src is not installed for `{TOOLCHAIN}` (needed by -Z build-std=core): {HINT}");
        }
        let Some(bpf_linker) = find_program("bpf-linker") else {
            bail!("bpf-linker not found on PATH nor in $CARGO_HOME/bin (it links the eBPF object): {HINT}");
        };
        match bpf_linker_version(&bpf_linker) {
            Some(version) if version == BPF_LINKER_VERSION => {}
            Some(version) => bail!(
                "{} is version {version}, the eBPF build expects {BPF_LINKER_VERSION}: {HINT}",
                bpf_linker.display()
            ),
            None => bail!(
                "{} does not run (is the LLVM it was built against gone?): {HINT}",
                bpf_linker.display()
            ),
        }
        Ok(Self { rustup, bpf_linker })
    }
}

/// Where rust-src puts the standard library sources inside a toolchain's sysroot.
pub fn rust_src_dir(sysroot: &Path) -> PathBuf {
    sysroot.join("lib/rustlib/src/rust/library")
}

/// The version `bpf_linker --version` reports, or `None` if it does not run.
pub fn bpf_linker_version(bpf_linker: &Path) -> Option<String> {
    let out = Command::new(bpf_linker).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    // Prints "bpf-linker 0.13.0".
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.split_whitespace().nth(1).map(str::to_owned)
}

/// `$CARGO_HOME/bin`, where rustup's proxies and `cargo install` put binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    Some(cargo_home.join("bin"))
}

/// Finds `name` on PATH, then in `$CARGO_HOME/bin` (a fresh shell may not have it on PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(cargo_bin_dir())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// One build of the eBPF crate.
pub struct EbpfBuild {
    /// The `flannel-ebpf` directory (its own cargo workspace).
    pub crate_dir: PathBuf,
    /// Release profile. Both profiles are optimised (see flannel-ebpf/Cargo.toml).
    pub release: bool,
}

impl EbpfBuild {
    /// A build of the crate in `crate_dir`.
    pub fn new(crate_dir: PathBuf, release: bool) -> Self {
        Self { crate_dir, release }
    }

    /// Where the object lands after `command("build", ..)` succeeds.
    pub fn object_path(&self) -> PathBuf {
        let profile = if self.release { "release" } else { "debug" };
        self.target_dir().join(TARGET).join(profile).join(BIN)
    }

    /// The crate's own target dir. Always passed explicitly: if a CARGO_TARGET_DIR shared
    /// with the host build leaked in, the nested cargo would wait forever on the lock that
    /// the outer cargo (running our build script) holds.
    pub fn target_dir(&self) -> PathBuf {
        self.crate_dir.join("target")
    }

    /// `cargo +nightly <subcommand> --target bpfel-unknown-none -Z build-std=core [--release]`
    /// in the crate directory, with an environment scrubbed of the outer cargo's settings.
    pub fn command(&self, subcommand: &str, tools: &Tools) -> Command {
        let mut cmd = Command::new(&tools.rustup);
        cmd.args([
            "run",
            TOOLCHAIN,
            "cargo",
            subcommand,
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ]);
        if self.release {
            cmd.arg("--release");
        }
        cmd.arg("--target-dir").arg(self.target_dir());
        // The working directory selects flannel-ebpf/.cargo/config.toml, which holds the
        // rustflags that make bpf-linker emit BTF.
        cmd.current_dir(&self.crate_dir);
        for (key, _) in env::vars_os() {
            if is_outer_cargo_setting(&key) {
                cmd.env_remove(key);
            }
        }
        if let Some(linker_dir) = tools.bpf_linker.parent() {
            // rustc looks bpf-linker up on PATH; make sure the one we checked is found first.
            let path = env::var_os("PATH").unwrap_or_default();
            let dirs = std::iter::once(linker_dir.to_path_buf()).chain(env::split_paths(&path));
            if let Ok(joined) = env::join_paths(dirs) {
                cmd.env("PATH", joined);
            }
        }
        cmd
    }
}

/// Environment that would make the nested cargo build with the host's compiler, wrapper,
/// flags, target dir or profile overrides instead of the eBPF crate's own. Cargo sets some of
/// these for build scripts (RUSTC, CARGO_ENCODED_RUSTFLAGS, clippy's wrapper); users and CI
/// set others.
fn is_outer_cargo_setting(key: &OsStr) -> bool {
    const EXACT: [&str; 13] = [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_BUILD_DIR",
        "RUSTUP_TOOLCHAIN",
    ];
    const PREFIXES: [&str; 2] = ["CARGO_PROFILE_", "CARGO_TARGET_"];
    let Some(key) = key.to_str() else {
        return false;
    };
    EXACT.contains(&key) || PREFIXES.iter().any(|prefix| key.starts_with(prefix))
}

/// Runs `cmd` and fails with `what` if it does not exit successfully.
pub fn run(mut cmd: Command, what: &str) -> Result<()> {
    let line = describe(&cmd);
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start `{line}`"))?;
    if !status.success() {
        bail!("{what} failed ({status}): `{line}`");
    }
    Ok(())
}

/// `cmd` as a shell-like line (program and arguments; `Command`'s Debug output would also
/// list every scrubbed variable).
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}
