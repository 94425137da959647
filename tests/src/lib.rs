//! Test harnesses shared by the integration tests, the demo and the benchmarks.

pub mod bench;
pub mod etcd;
pub mod kube_api;
pub mod process;
pub mod testbed;
