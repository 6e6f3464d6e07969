//! `calicoctl ipam`: show usage, the configuration, one address; configure; release.

use std::net::IpAddr;

use clap::{Args, Subcommand};
use ipnet::IpNet;

use super::CtlError;
use super::output::boxed_table;
use crate::datastore::Client;
use crate::ipam::Ipam;
use crate::model::IPPoolSpec;

/// `calicoctl ipam ...`
#[derive(Debug, Args)]
pub struct IpamArgs {
    #[command(subcommand)]
    pub command: IpamCommand,
}

/// IPAM sub-commands.
#[derive(Debug, Subcommand)]
pub enum IpamCommand {
    /// Show address usage per pool (and per block), the configuration, or one address.
    Show {
        /// Show who holds this address.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// Add a row per block.
        #[arg(long = "show-blocks")]
        show_blocks: bool,
        /// List addresses borrowed from other hosts' blocks.
        #[arg(long = "show-borrowed")]
        show_borrowed: bool,
        /// Show the IPAM configuration.
        #[arg(long = "show-configuration")]
        show_configuration: bool,
    },
    /// Change the IPAM configuration.
    Configure {
        /// Only hand out addresses from a host's own blocks (true|false).
        #[arg(long = "strictaffinity")]
        strict_affinity: Option<bool>,
        /// How many blocks a host may claim (0 = default).
        #[arg(long = "max-blocks-per-host")]
        max_blocks_per_host: Option<u32>,
    },
    /// Release an address (only for leaked ones: a live pod would lose it).
    Release {
        #[arg(long)]
        ip: IpAddr,
    },
    /// Report leaked allocations and affinities of nodes that no longer exist.
    Check,
    /// Free leaks seen in two observations `--grace` seconds apart.
    Gc {
        /// Seconds between the two observations.
        #[arg(long, default_value_t = 5)]
        grace: u64,
    },
}

fn pct(n: u128, total: u128) -> String {
    if total == 0 {
        "0%".into()
    } else {
        format!("{:.0}%", 100.0 * n as f64 / total as f64)
    }
}

fn size(net: &IpNet) -> u128 {
    1u128 << (net.max_prefix_len() - net.prefix_len())
}

/// Run an IPAM command.
pub async fn execute(client: &Client, args: &IpamArgs) -> Result<String, CtlError> {
    let ipam = Ipam::new(client.datastore().clone());
    let err = |e: crate::ipam::IpamError| CtlError::Usage(e.to_string());
    match &args.command {
        IpamCommand::Show { ip: Some(ip), .. } => match ipam.lookup(*ip).await.map_err(err)? {
            None => Ok(format!("IP {ip} is not currently assigned")),
            Some((block, handle)) => {
                let (_, b) = ipam
                    .blocks(ip.is_ipv6())
                    .await
                    .map_err(err)?
                    .into_iter()
                    .find(|(c, _)| *c == block)
                    .ok_or_else(|| CtlError::Usage(format!("block {block} vanished")))?;
                let ord = crate::model::ipam::ordinal_in(&block, *ip).unwrap_or(0);
                let attrs = b
                    .allocations
                    .get(ord)
                    .copied()
                    .flatten()
                    .and_then(|a| b.attributes.get(a))
                    .and_then(|a| a.secondary.clone())
                    .unwrap_or_default();
                let mut out = format!("IP {ip} is in use\nBlock: {block}\n");
                if let Some(h) = handle {
                    out.push_str(&format!("Handle: \"{h}\"\n"));
                }
                if !attrs.is_empty() {
                    out.push_str("Attributes:\n");
                    for (k, v) in attrs {
                        out.push_str(&format!("  {k}: {v}\n"));
                    }
                }
                Ok(out)
            }
        },
        IpamCommand::Show {
            show_configuration: true,
            ..
        } => {
            let c = ipam.config().await.map_err(err)?;
            Ok(boxed_table(
                &["PROPERTY", "VALUE"],
                &[
                    vec!["StrictAffinity".into(), c.strict_affinity.to_string()],
                    vec![
                        "AutoAllocateBlocks".into(),
                        c.auto_allocate_blocks.to_string(),
                    ],
                    vec!["MaxBlocksPerHost".into(), c.max_blocks_per_host.to_string()],
                ],
            ))
        }
        IpamCommand::Show {
            show_borrowed: true,
            ..
        } => {
            let mut rows = Vec::new();
            for v6 in [false, true] {
                for (cidr, b) in ipam.blocks(v6).await.map_err(err)? {
                    for (ord, a) in b.allocations.iter().enumerate() {
                        let Some(attr) = a.and_then(|i| b.attributes.get(i)) else {
                            continue;
                        };
                        let sec = attr.secondary.clone().unwrap_or_default();
                        let node = sec.get("node").cloned().unwrap_or_default();
                        if b.host() == Some(node.as_str()) {
                            continue;
                        }
                        let to = match (sec.get("namespace"), sec.get("pod")) {
                            (Some(ns), Some(p)) => format!("{ns}/{p}"),
                            _ => sec.get("type").cloned().unwrap_or_default(),
                        };
                        rows.push(vec![
                            crate::model::ipam::nth_ip(&cidr, ord).to_string(),
                            node,
                            cidr.to_string(),
                            b.host().unwrap_or("").to_string(),
                            sec.get("type").cloned().unwrap_or_default(),
                            to,
                        ]);
                    }
                }
            }
            Ok(boxed_table(
                &[
                    "IP",
                    "BORROWING-NODE",
                    "BLOCK",
                    "BLOCK OWNER",
                    "TYPE",
                    "ALLOCATED-TO",
                ],
                &rows,
            ))
        }
        IpamCommand::Show { show_blocks, .. } => {
            let (pools, _) = client.list::<IPPoolSpec>(None).await?;
            let mut rows = Vec::new();
            for pool in &pools {
                let Some(net) = pool.spec.net() else { continue };
                let blocks: Vec<_> = ipam
                    .blocks(matches!(net, IpNet::V6(_)))
                    .await
                    .map_err(err)?
                    .into_iter()
                    .filter(|(c, _)| net.contains(&c.network()))
                    .collect();
                let total = size(&net);
                let used: u128 = blocks.iter().map(|(_, b)| b.in_use() as u128).sum();
                rows.push(vec![
                    "IP Pool".into(),
                    net.to_string(),
                    total.to_string(),
                    format!("{used} ({})", pct(used, total)),
                    format!("{} ({})", total - used, pct(total - used, total)),
                ]);
                if *show_blocks {
                    for (c, b) in &blocks {
                        let (t, u) = (size(c), b.in_use() as u128);
                        rows.push(vec![
                            "Block".into(),
                            c.to_string(),
                            t.to_string(),
                            format!("{u} ({})", pct(u, t)),
                            format!("{} ({})", t - u, pct(t - u, t)),
                        ]);
                    }
                }
            }
            Ok(boxed_table(
                &["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"],
                &rows,
            ))
        }
        IpamCommand::Configure {
            strict_affinity,
            max_blocks_per_host,
        } => {
            if strict_affinity.is_none() && max_blocks_per_host.is_none() {
                return Err(CtlError::Usage(
                    "configure needs --strictaffinity and/or --max-blocks-per-host".into(),
                ));
            }
            let mut c = ipam.config().await.map_err(err)?;
            if let Some(s) = strict_affinity {
                c.strict_affinity = *s;
            }
            if let Some(m) = max_blocks_per_host {
                c.max_blocks_per_host = *m;
            }
            ipam.set_config(&c).await.map_err(err)?;
            Ok("Successfully set IPAM configuration".into())
        }
        IpamCommand::Check => {
            let snap = crate::ipam::gc::snapshot(&ipam, client)
                .await
                .map_err(err)?;
            let leaks = crate::ipam::gc::find_leaks(&snap);
            let mut out = format!(
                "Checking IPAM for inconsistencies...\nFound {} IPAM blocks, {} affinities, {} nodes, {} workload addresses.\n",
                snap.blocks.len(),
                snap.affinities.len(),
                snap.nodes.len(),
                snap.endpoint_ips.len()
            );
            for l in &leaks {
                out.push_str(&format!("  leaked: {l}\n"));
            }
            out.push_str(&format!(
                "Check complete; found {} problem(s).",
                leaks.len()
            ));
            Ok(out)
        }
        IpamCommand::Gc { grace } => {
            let grace = std::time::Duration::from_secs(*grace);
            let mut tracker = crate::ipam::gc::LeakTracker::default();
            let first = crate::ipam::gc::find_leaks(
                &crate::ipam::gc::snapshot(&ipam, client)
                    .await
                    .map_err(err)?,
            );
            tracker.observe(first, std::time::Instant::now(), grace);
            tokio::time::sleep(grace).await;
            let second = crate::ipam::gc::find_leaks(
                &crate::ipam::gc::snapshot(&ipam, client)
                    .await
                    .map_err(err)?,
            );
            let confirmed = tracker.observe(second, std::time::Instant::now(), grace);
            let freed = crate::ipam::gc::free(&ipam, &confirmed)
                .await
                .map_err(err)?;
            let mut out = String::new();
            for l in &freed {
                out.push_str(&format!("  freed: {l}\n"));
            }
            out.push_str(&format!("Released {} leak(s).", freed.len()));
            Ok(out)
        }
        IpamCommand::Release { ip } => {
            let released = ipam.release_ips(&[*ip]).await.map_err(err)?;
            if released.is_empty() {
                return Err(CtlError::Usage(format!("IP address {ip} is not assigned")));
            }
            Ok(format!("Successfully released IP address {ip}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::datastore::MemoryDatastore;
    use crate::ipam::AssignArgs;
    use crate::model::IPPool;

    async fn run(c: &Client, args: &[&str]) -> Result<String, CtlError> {
        let mut argv = vec!["calicoctl"];
        argv.extend_from_slice(args);
        let cli = <super::super::Cli as clap::Parser>::try_parse_from(argv)
            .map_err(|e| CtlError::Usage(e.to_string()))?;
        super::super::execute(c, &cli.command, &mut &b""[..]).await
    }

    #[tokio::test]
    async fn show_configure_release() {
        let ds: Arc<dyn crate::datastore::Datastore> = Arc::new(MemoryDatastore::new());
        let c = Client::new(ds.clone());
        c.create(IPPool::new(
            "p",
            IPPoolSpec {
                cidr: "10.65.0.0/24".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
        let ipam = Ipam::new(ds);
        let ips = ipam
            .auto_assign(&AssignArgs {
                num_v4: 3,
                ..AssignArgs::v4("k8s-pod-network.c1", "node-1")
            })
            .await
            .unwrap();
        let show = run(&c, &["ipam", "show"]).await.unwrap();
        assert!(
            show.contains("| IP Pool  | 10.65.0.0/24 |       256 | 3 (1%)     | 253 (99%) |"),
            "{show}"
        );
        let blocks = run(&c, &["ipam", "show", "--show-blocks"]).await.unwrap();
        assert!(blocks.contains("| Block    |"), "{blocks}");
        assert!(
            blocks.contains("|        64 | 3 (5%)     | 61 (95%)  |"),
            "{blocks}"
        );
        let one = run(&c, &["ipam", "show", &format!("--ip={}", ips[0])])
            .await
            .unwrap();
        assert!(
            one.starts_with(&format!("IP {} is in use\n", ips[0])),
            "{one}"
        );
        assert!(one.contains("Handle: \"k8s-pod-network.c1\""));
        assert_eq!(
            run(
                &c,
                &[
                    "ipam",
                    "configure",
                    "--strictaffinity=true",
                    "--max-blocks-per-host=4"
                ]
            )
            .await
            .unwrap(),
            "Successfully set IPAM configuration"
        );
        let cfg = run(&c, &["ipam", "show", "--show-configuration"])
            .await
            .unwrap();
        assert!(
            cfg.contains("| StrictAffinity     | true  |")
                && cfg.contains("| MaxBlocksPerHost   |     4 |"),
            "{cfg}"
        );
        assert_eq!(
            run(&c, &["ipam", "release", &format!("--ip={}", ips[1])])
                .await
                .unwrap(),
            format!("Successfully released IP address {}", ips[1])
        );
        assert_eq!(
            run(&c, &["ipam", "show", &format!("--ip={}", ips[1])])
                .await
                .unwrap(),
            format!("IP {} is not currently assigned", ips[1])
        );
        assert!(
            run(&c, &["ipam", "release", &format!("--ip={}", ips[1])])
                .await
                .is_err()
        );
    }
}
