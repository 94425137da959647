//! `flannel`: the CNI plugin. The runtime runs it with `CNI_*` in the environment and the
//! network config on stdin; it prints a result or an error object and exits 0 or 1. All
//! the logic is in `flannel_agent::cni`; this reads the inputs and writes the outputs.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

fn main() -> ExitCode {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut stdin = Vec::new();
    // An unreadable stdin is the same as an empty one: NetConf::parse reports it as an
    // invalid config (code 7), and VERSION does not need it.
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("flannel: reading stdin: {e}");
        stdin.clear();
    }
    let reply = flannel_agent::cni::handle(&env, &stdin);
    if let Some(out) = &reply.stdout {
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{out}").and_then(|()| stdout.flush()).is_err() {
            return ExitCode::FAILURE;
        }
    }
    if reply.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
