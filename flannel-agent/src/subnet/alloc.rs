//! Picking a free subnet, as upstream's `allocateSubnet`: scan from SubnetMin up
//! to SubnetMax in SubnetLen steps, keep the first 100 that overlap no existing
//! lease (leases outside the range count too), and pick one at random so that
//! nodes starting together rarely race for the same one.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::seq::SliceRandom;

use crate::config::NetworkConfig;

/// How many free candidates are collected before one is picked.
const MAX_CANDIDATES: usize = 100;

/// A free IPv4 subnet for `config`, avoiding `taken`; `None` when the range is full.
pub fn free_v4(config: &NetworkConfig, taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    let (min, max) = (u32::from(config.subnet_min?), u32::from(config.subnet_max?));
    let step = 1u64 << (32 - config.subnet_len);
    let mut cands = Vec::new();
    let mut cur = u64::from(min);
    while cur <= u64::from(max) && cands.len() < MAX_CANDIDATES {
        let sn = Ipv4Net::new(Ipv4Addr::from(cur as u32), config.subnet_len).ok()?;
        if !taken
            .iter()
            .any(|t| t.contains(&sn.network()) || sn.contains(&t.network()))
        {
            cands.push(sn);
        }
        cur += step;
    }
    cands.choose(&mut rand::thread_rng()).copied()
}

/// A free IPv6 subnet for `config`, avoiding `taken`; `None` when the range is full.
pub fn free_v6(config: &NetworkConfig, taken: &[Ipv6Net]) -> Option<Ipv6Net> {
    let (min, max) = (u128::from(config.ipv6_subnet_min?), u128::from(config.ipv6_subnet_max?));
    let step = 1u128 << (128 - config.ipv6_subnet_len);
    let mut cands = Vec::new();
    let mut cur = min;
    while cur <= max && cands.len() < MAX_CANDIDATES {
        let sn = Ipv6Net::new(Ipv6Addr::from(cur), config.ipv6_subnet_len).ok()?;
        if !taken
            .iter()
            .any(|t| t.contains(&sn.network()) || sn.contains(&t.network()))
        {
            cands.push(sn);
        }
        match cur.checked_add(step) {
            Some(n) => cur = n,
            None => break,
        }
    }
    cands.choose(&mut rand::thread_rng()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_inside_the_range_and_avoids_taken() {
        let cfg = NetworkConfig::parse_and_check(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.12.0"}"#,
        )
        .unwrap();
        let taken: Vec<Ipv4Net> = vec!["10.5.10.0/24".parse().unwrap(), "10.5.11.0/25".parse().unwrap()];
        for _ in 0..50 {
            assert_eq!(free_v4(&cfg, &taken), Some("10.5.12.0/24".parse().unwrap()));
        }
        let all: Vec<Ipv4Net> = vec!["10.5.0.0/16".parse().unwrap()];
        assert_eq!(free_v4(&cfg, &all), None);
    }

    #[test]
    fn spreads_over_candidates() {
        let cfg = NetworkConfig::parse_and_check(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let picks: std::collections::HashSet<_> = (0..200).map(|_| free_v4(&cfg, &[]).unwrap()).collect();
        assert!(
            picks.len() > 20,
            "random choice among the first 100: got {}",
            picks.len()
        );
        assert!(picks.iter().all(|p| cfg.v4_compatible(p)));
    }

    #[test]
    fn v6_allocation() {
        let cfg = NetworkConfig::parse_and_check(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120","IPv6SubnetLen":122}"#,
        )
        .unwrap();
        let taken: Vec<Ipv6Net> = vec!["fd00::40/122".parse().unwrap(), "fd00::80/122".parse().unwrap()];
        assert_eq!(free_v6(&cfg, &taken), Some("fd00::c0/122".parse().unwrap()));
    }
}
