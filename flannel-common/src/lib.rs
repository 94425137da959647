//! The kernel/user contract of flannel-rs (placeholder until the datapath lands).
#![no_std]
