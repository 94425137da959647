//! flannel-rs node agent: `flanneld` and its building blocks.
//!
//! The layout follows the kernel interfaces and the stores the agent talks to:
//! `config` (net-conf.json), `subnet` (leases in etcd or the Kubernetes API),
//! `backend` (how remote subnets are reached), `netlink` (the only user of
//! rtnetlink) and `daemon` (the tasks that tie them together).

pub mod backend;
pub mod backoff;
pub mod cni;
pub mod cni_install;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod dataplane;
pub mod flags;
pub mod health;
pub mod metrics;
pub mod netlink;
pub mod subnet;
pub mod subnet_file;
pub mod traffic;
