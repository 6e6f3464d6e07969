//! calicoctl: Calico's resource commands over the typed client (REFERENCE §7).
//!
//! Writes from a file are all-or-nothing as far as validation goes: every document is
//! decoded, defaulted and checked (fields, existence, immutable fields, pool overlap with
//! the datastore and with the other documents) before the first one is written.

pub mod ipam;
pub mod node_status;
pub mod output;

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use serde_json::Value;

use crate::datastore::client::WriteOp;
use crate::datastore::{Client, ClientError, DatastoreConfig};
use crate::env::Env;
use crate::model::{AnyResource, BGPConfigurationSpec, KindInfo, lookup_kind};
use output::{Format, TableContext};

/// Default location of calicoctl's configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/calico/calicoctl.cfg";

/// Command line of calicoctl.
#[derive(Debug, Parser)]
#[command(
    name = "calicoctl",
    version,
    about = "Manage Calico resources in the datastore"
)]
pub struct Cli {
    /// Path to the calicoctl configuration file (CalicoAPIConfig); when it does not exist
    /// the environment (DATASTORE_TYPE, ETCD_ENDPOINTS, ETCD_*_FILE) is used.
    #[arg(short = 'c', long = "config", global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// calicoctl sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create resources from a file (fails if any exists).
    Create(FileArgs),
    /// Create or update resources from a file.
    Apply(FileArgs),
    /// Replace existing resources from a file.
    Replace(FileArgs),
    /// Delete resources named in a file or on the command line.
    Delete(DeleteArgs),
    /// Show resources.
    Get(GetArgs),
    /// Patch a resource with a JSON merge patch.
    Patch(PatchArgs),
    /// IP address management.
    Ipam(ipam::IpamArgs),
    /// This node's calico-node.
    Node(NodeArgs),
    /// Print the version.
    Version,
}

/// `calicoctl node ...`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub command: NodeCommand,
}

/// `calicoctl node` sub-commands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// BGP sessions of the calico-node on this host (read from its status socket,
    /// CALICO_BGP_STATUS_SOCKET or /var/run/calico/bgp-status.sock).
    Status,
}

/// `calicoctl node status`: the text and the exit code.
pub fn node_status(env: &dyn Env) -> (String, i32) {
    let path = env
        .var("CALICO_BGP_STATUS_SOCKET")
        .unwrap_or_else(|| crate::bgp::status::DEFAULT_SOCKET.to_string());
    match crate::bgp::status::fetch(std::path::Path::new(&path)) {
        Ok(peers) => (node_status::render_node_status(&peers), 0),
        Err(_) => ("Calico process is not running.\n".to_string(), 1),
    }
}

/// `-f FILE|-`.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// YAML or JSON file with one or more resources; `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub filename: String,
    /// With create: do not fail on resources that already exist.
    #[arg(long = "skip-exists")]
    pub skip_exists: bool,
}

/// Arguments of `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Resource kind (e.g. ippool) when deleting by name.
    pub kind: Option<String>,
    /// Names to delete.
    pub names: Vec<String>,
    /// File naming the resources to delete.
    #[arg(short = 'f', long = "filename")]
    pub filename: Option<String>,
    /// Namespace of namespaced kinds.
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// Do not fail on resources that do not exist.
    #[arg(long = "skip-not-exists")]
    pub skip_not_exists: bool,
}

/// Arguments of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Resource kind: ippool (ipp), node, bgppeer (bgpp), bgpconfig, felixconfig,
    /// workloadendpoint (wep), clusterinformation.
    pub kind: String,
    /// Names to show (all when none).
    pub names: Vec<String>,
    /// Output format: ps, wide, yaml or json.
    #[arg(short = 'o', long = "output", default_value = "ps")]
    pub output: String,
    /// Namespace of namespaced kinds (default: default).
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// Show every namespace.
    #[arg(short = 'A', long = "all-namespaces")]
    pub all_namespaces: bool,
}

/// Arguments of `patch`.
#[derive(Debug, Args)]
pub struct PatchArgs {
    /// Resource kind.
    pub kind: String,
    /// Resource name.
    pub name: String,
    /// JSON merge patch (RFC 7386), e.g. '{"spec":{"natOutgoing":true}}'.
    #[arg(short = 'p', long = "patch")]
    pub patch: String,
    /// Namespace of namespaced kinds.
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
}

/// A calicoctl failure: printed on stderr, exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad arguments or file contents.
    #[error("{0}")]
    Usage(String),
    /// The datastore or a resource rule refused the operation.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Parse a multi-document YAML or JSON text into documents; `List` documents are expanded.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v =
            Value::deserialize(de).map_err(|e| format!("document {}: cannot parse: {e}", i + 1))?;
        if v.is_null() {
            continue;
        }
        let is_list = v
            .get("kind")
            .and_then(Value::as_str)
            .is_some_and(|k| k == "List" || k.ends_with("List"));
        match (is_list, v.get("items")) {
            (true, Some(Value::Array(items))) => docs.extend(items.iter().cloned()),
            _ => docs.push(v),
        }
    }
    Ok(docs)
}

fn doc_label(v: &Value) -> String {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("(no kind)");
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{kind} \"{name}\"")
}

fn read_source(filename: &str, stdin: &mut dyn Read) -> Result<String, CtlError> {
    let mut text = String::new();
    if filename == "-" {
        stdin
            .read_to_string(&mut text)
            .map_err(|e| CtlError::Usage(format!("cannot read stdin: {e}")))?;
    } else {
        text = std::fs::read_to_string(filename)
            .map_err(|e| CtlError::Usage(format!("cannot read {filename}: {e}")))?;
    }
    Ok(text)
}

/// Decode every document; the first bad one is reported with its index, kind and name.
pub fn decode_documents(text: &str) -> Result<Vec<AnyResource>, CtlError> {
    let docs = parse_documents(text).map_err(CtlError::Usage)?;
    if docs.is_empty() {
        return Err(CtlError::Usage("no resources found in the input".into()));
    }
    docs.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let label = doc_label(&v);
            AnyResource::from_document(v)
                .map_err(|e| CtlError::Usage(format!("document {} ({label}): {e}", i + 1)))
        })
        .collect()
}

fn op_words(op: WriteOp) -> (&'static str, &'static str) {
    match op {
        WriteOp::Create => ("create", "created"),
        WriteOp::Apply => ("apply", "applied"),
        WriteOp::Replace => ("replace", "replaced"),
        WriteOp::Delete => ("delete", "deleted"),
    }
}

fn summary(op: WriteOp, done: &[AnyResource]) -> String {
    let (_, past) = op_words(op);
    let first = done.first().map(AnyResource::kind).unwrap_or("");
    if done.iter().all(|r| r.kind() == first) {
        format!("Successfully {past} {} '{first}' resource(s)", done.len())
    } else {
        format!("Successfully {past} {} resource(s)", done.len())
    }
}

/// Check the whole batch, then write it. Returns the message for stdout.
pub async fn write_batch(
    client: &Client,
    mut resources: Vec<AnyResource>,
    op: WriteOp,
    skip: bool,
) -> Result<String, CtlError> {
    let label = |r: &AnyResource| format!("{} \"{}\"", r.kind(), r.meta().name);
    for i in 0..resources.len() {
        for j in 0..i {
            if resources[j].kind() == resources[i].kind()
                && resources[j].namespace() == resources[i].namespace()
                && resources[j].meta().name == resources[i].meta().name
            {
                return Err(CtlError::Usage(format!(
                    "document {} ({}): the same resource is also document {}",
                    i + 1,
                    label(&resources[i]),
                    j + 1
                )));
            }
        }
    }
    let mut skipped = vec![false; resources.len()];
    for i in 0..resources.len() {
        let mut res = resources[i].clone();
        let others: Vec<AnyResource> = resources
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, r)| r.clone())
            .collect();
        match client.check_any(&mut res, op, &others).await {
            Ok(()) => resources[i] = res,
            Err(ClientError::AlreadyExists(_)) if skip && op == WriteOp::Create => {
                skipped[i] = true
            }
            Err(ClientError::NotFound(_)) if skip && op == WriteOp::Delete => skipped[i] = true,
            Err(e) => {
                let (verb, _) = op_words(op);
                return Err(CtlError::Usage(format!(
                    "Failed to {verb} any resources: document {} ({}): {e}",
                    i + 1,
                    label(&resources[i])
                )));
            }
        }
    }
    let total = resources.len();
    let mut done = Vec::new();
    for (res, skip) in resources.into_iter().zip(skipped) {
        if skip {
            continue;
        }
        let l = label(&res);
        match client.write_any(res, op).await {
            Ok(r) => done.push(r),
            Err(e) => {
                let (verb, past) = op_words(op);
                let prefix = if done.is_empty() {
                    format!("Failed to {verb} any resources")
                } else {
                    format!(
                        "Partial success: {past} the first {} out of {total} resources",
                        done.len()
                    )
                };
                return Err(CtlError::Usage(format!("{prefix}: {l}: {e}")));
            }
        }
    }
    Ok(summary(op, &done))
}

fn kind_arg(kind: &str) -> Result<&'static KindInfo, CtlError> {
    lookup_kind(kind).ok_or_else(|| {
        CtlError::Usage(format!(
            "resource type '{kind}' is not supported (supported: ippool, bgpconfiguration, bgppeer, node, felixconfiguration, workloadendpoint, clusterinformation, tier, networkset, globalnetworkset)"
        ))
    })
}

async fn global_as(client: &Client) -> String {
    match client.get::<BGPConfigurationSpec>(None, "default").await {
        Ok(Some(c)) => c
            .spec
            .as_number
            .map_or_else(|| "64512".into(), |a| a.to_string()),
        _ => "64512".into(),
    }
}

async fn get(client: &Client, args: &GetArgs) -> Result<String, CtlError> {
    let info = kind_arg(&args.kind)?;
    let format: Format = args.output.parse().map_err(CtlError::Usage)?;
    let ns = if args.all_namespaces {
        None
    } else {
        Some(args.namespace.as_deref().unwrap_or("default"))
    };
    let (items, revision) = if args.names.is_empty() {
        let (mut items, rev) = client.list_any(info, ns).await?;
        crate::model::tier::calicoctl_list(&mut items);
        (items, rev)
    } else {
        let mut items = Vec::new();
        for name in &args.names {
            match client.get_any(info, ns, name).await? {
                Some(r) => items.push(r),
                None => {
                    let what = match (info.namespaced, ns) {
                        (true, Some(ns)) => format!("{}({ns}/{name})", info.kind),
                        _ => format!("{}({name})", info.kind),
                    };
                    return Err(ClientError::NotFound(what).into());
                }
            }
        }
        (items, 0)
    };
    let list = args.names.len() != 1;
    Ok(match format {
        Format::Ps | Format::Wide => {
            let ctx = TableContext {
                global_as: global_as(client).await,
                all_namespaces: args.all_namespaces && info.namespaced,
            };
            output::table(info, &items, format == Format::Wide, &ctx)
        }
        Format::Yaml => output::yaml(info, &items, revision, list),
        Format::Json => output::json(info, &items, revision, list),
    })
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("just made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

async fn patch(client: &Client, args: &PatchArgs) -> Result<String, CtlError> {
    let info = kind_arg(&args.kind)?;
    let p: Value = serde_json::from_str(&args.patch)
        .map_err(|e| CtlError::Usage(format!("invalid patch (must be a JSON merge patch): {e}")))?;
    for _ in 0..5 {
        let current = client
            .get_any(info, args.namespace.as_deref(), &args.name)
            .await?
            .ok_or_else(|| ClientError::NotFound(format!("{}({})", info.kind, args.name)))?;
        let mut v = current.to_value();
        merge_patch(&mut v, &p);
        // The patch may not rename or move the resource.
        v["metadata"]["name"] = Value::from(args.name.clone());
        v["metadata"]["resourceVersion"] = Value::from(current.meta().resource_version.clone());
        // Fields of a newer Calico the stored value has are carried along; the rest is
        // decoded strictly, so a field the patch misspells is still refused by name.
        let kept = current.unknown().take_from(&mut v);
        let mut res = AnyResource::decode(info.kind, v)
            .map_err(|e| CtlError::Usage(format!("patched {}: {e}", info.kind)))?;
        *res.unknown_mut() = kept;
        let mut checked = res.clone();
        client
            .check_any(&mut checked, WriteOp::Replace, &[])
            .await?;
        match client.write_any(checked, WriteOp::Replace).await {
            Ok(_) => return Ok(format!("Successfully patched 1 '{}' resource", info.kind)),
            Err(ClientError::Conflict(..)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CtlError::Usage(format!(
        "{}({}) kept changing while patching; try again",
        info.kind, args.name
    )))
}

async fn delete(
    client: &Client,
    args: &DeleteArgs,
    stdin: &mut dyn Read,
) -> Result<String, CtlError> {
    let resources = match (&args.filename, &args.kind) {
        (Some(f), None) => decode_documents(&read_source(f, stdin)?)?,
        (None, Some(kind)) => {
            let info = kind_arg(kind)?;
            if args.names.is_empty() {
                return Err(CtlError::Usage(
                    "delete needs at least one resource name".into(),
                ));
            }
            let mut out = Vec::new();
            for name in &args.names {
                let mut v = serde_json::json!({"apiVersion": crate::model::API_VERSION, "kind": info.kind, "metadata": {"name": name}});
                if info.namespaced {
                    v["metadata"]["namespace"] =
                        Value::from(args.namespace.clone().unwrap_or_else(|| "default".into()));
                }
                out.push(
                    AnyResource::decode(info.kind, v)
                        .map_err(|e| CtlError::Usage(e.to_string()))?,
                );
            }
            out
        }
        _ => {
            return Err(CtlError::Usage(
                "delete takes either -f FILE or KIND NAME...".into(),
            ));
        }
    };
    write_batch(client, resources, WriteOp::Delete, args.skip_not_exists).await
}

/// Run one command against a client; returns what to print on stdout.
pub async fn execute(
    client: &Client,
    command: &Command,
    stdin: &mut dyn Read,
) -> Result<String, CtlError> {
    match command {
        Command::Create(a) => {
            write_batch(
                client,
                decode_documents(&read_source(&a.filename, stdin)?)?,
                WriteOp::Create,
                a.skip_exists,
            )
            .await
        }
        Command::Apply(a) => {
            write_batch(
                client,
                decode_documents(&read_source(&a.filename, stdin)?)?,
                WriteOp::Apply,
                false,
            )
            .await
        }
        Command::Replace(a) => {
            write_batch(
                client,
                decode_documents(&read_source(&a.filename, stdin)?)?,
                WriteOp::Replace,
                false,
            )
            .await
        }
        Command::Delete(a) => delete(client, a, stdin).await,
        Command::Get(a) => get(client, a).await,
        Command::Patch(a) => patch(client, a).await,
        Command::Ipam(a) => ipam::execute(client, a).await,
        Command::Node(_) => Err(CtlError::Usage(
            "node commands do not use the datastore".into(),
        )),
        Command::Version => Ok(version()),
    }
}

/// `calicoctl version` text.
pub fn version() -> String {
    format!("Client Version:    v{}\n", env!("CARGO_PKG_VERSION"))
}

/// calicoctl's main: parse, connect, execute, print. Returns the exit code.
pub async fn main(
    args: Vec<String>,
    env: &dyn Env,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = if code == 0 {
                write!(out, "{e}")
            } else {
                write!(err, "{e}")
            };
            return code;
        }
    };
    if let Command::Version = cli.command {
        let _ = write!(out, "{}", version());
        return 0;
    }
    if let Command::Node(NodeArgs {
        command: NodeCommand::Status,
    }) = cli.command
    {
        let (text, code) = node_status(env);
        let _ = write!(out, "{text}");
        return code;
    }
    let result = async {
        let cfg = DatastoreConfig::for_calicoctl(&cli.config, env)
            .map_err(|e| CtlError::Usage(e.to_string()))?;
        let ds = cfg
            .connect()
            .await
            .map_err(|e| CtlError::Usage(e.to_string()))?;
        execute(&Client::new(ds), &cli.command, stdin).await
    }
    .await;
    match result {
        Ok(text) => {
            let _ = write!(out, "{text}");
            if !text.ends_with('\n') {
                let _ = writeln!(out);
            }
            0
        }
        Err(e) => {
            let _ = writeln!(err, "{e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::datastore::MemoryDatastore;

    const TWO_POOLS: &str = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: a\nspec:\n  cidr: 10.1.0.0/16\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: b\nspec:\n  cidr: 10.2.0.0/16\n  natOutgoing: true\n";

    fn client() -> Client {
        Client::new(Arc::new(MemoryDatastore::new()))
    }

    async fn run(c: &Client, args: &[&str], input: &str) -> Result<String, CtlError> {
        let mut argv = vec!["calicoctl"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| CtlError::Usage(e.to_string()))?;
        execute(c, &cli.command, &mut input.as_bytes()).await
    }

    #[tokio::test]
    async fn apply_then_get_wide_shows_calicos_columns() {
        let c = client();
        assert_eq!(
            run(&c, &["apply", "-f", "-"], TWO_POOLS).await.unwrap(),
            "Successfully applied 2 'IPPool' resource(s)"
        );
        let out = run(&c, &["get", "ipp", "-o", "wide"], "").await.unwrap();
        assert_eq!(
            out,
            "NAME   CIDR          NAT     IPIPMODE   VXLANMODE   DISABLED   DISABLEBGPEXPORT   SELECTOR   \n\
             a      10.1.0.0/16   false   Never      Never       false      false              all()      \n\
             b      10.2.0.0/16   true    Never      Never       false      false              all()      \n"
        );
    }

    #[tokio::test]
    async fn one_bad_document_writes_nothing() {
        let c = client();
        let bad = format!(
            "{TWO_POOLS}---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: c\nspec:\n  cidr: 10.3.0.1/16\n"
        );
        let e = run(&c, &["create", "-f", "-"], &bad)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Failed to create any resources: document 3 (IPPool \"c\"): error with field spec.cidr = '10.3.0.1/16' (CIDR is not strictly masked; did you mean 10.3.0.0/16?)"
        );
        assert_eq!(
            run(&c, &["get", "ipp"], "").await.unwrap(),
            "NAME   CIDR   SELECTOR   \n"
        );
    }

    #[tokio::test]
    async fn overlap_inside_one_file_is_refused() {
        let c = client();
        let bad = TWO_POOLS.replace("10.2.0.0/16", "10.1.64.0/18");
        let e = run(&c, &["apply", "-f", "-"], &bad)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("document 1 (IPPool \"a\"): error with field spec.cidr = '10.1.0.0/16' (IPPool CIDR overlaps with IPPool b (10.1.64.0/18))"), "{e}");
    }

    #[tokio::test]
    async fn patch_merges_and_validates() {
        let c = client();
        run(&c, &["apply", "-f", "-"], TWO_POOLS).await.unwrap();
        assert_eq!(
            run(
                &c,
                &[
                    "patch",
                    "ippool",
                    "a",
                    "-p",
                    r#"{"spec":{"vxlanMode":"Always"}}"#
                ],
                ""
            )
            .await
            .unwrap(),
            "Successfully patched 1 'IPPool' resource"
        );
        let e = run(
            &c,
            &[
                "patch",
                "ippool",
                "a",
                "-p",
                r#"{"spec":{"cidr":"10.9.0.0/16"}}"#,
            ],
            "",
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "error with field spec.cidr = '10.9.0.0/16' (IPPool CIDR cannot be modified (was 10.1.0.0/16))"
        );
        let y = run(&c, &["get", "ippool", "a", "-o", "yaml"], "")
            .await
            .unwrap();
        assert!(y.contains("vxlanMode: Always"), "{y}");
    }

    #[tokio::test]
    async fn delete_by_name_and_missing_name_fails() {
        let c = client();
        run(&c, &["apply", "-f", "-"], TWO_POOLS).await.unwrap();
        assert_eq!(
            run(&c, &["delete", "ippool", "a"], "").await.unwrap(),
            "Successfully deleted 1 'IPPool' resource(s)"
        );
        let e = run(&c, &["delete", "ippool", "a"], "")
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Failed to delete any resources: document 1 (IPPool \"a\"): resource does not exist: IPPool(a)"
        );
        assert!(
            run(&c, &["delete", "ippool", "a", "--skip-not-exists"], "")
                .await
                .is_ok()
        );
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(
            &mut t,
            &serde_json::json!({"a": {"b": null, "e": 3}, "d": [2]}),
        );
        assert_eq!(t, serde_json::json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
