//! The etcd backend over TLS with client certificates (ETCD_CA_CERT_FILE, ETCD_CERT_FILE,
//! ETCD_KEY_FILE), and with several endpoints of which one is down.

mod common;

use calico_node::datastore::{Client, DatastoreConfig, DatastoreError};
use calico_node::env::MapEnv;
use calico_node::model::{IPPool, IPPoolSpec};
use common::Etcd;

fn pool() -> IPPool {
    IPPool::new(
        "tls-pool",
        IPPoolSpec {
            cidr: "10.70.0.0/16".into(),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn tls_with_client_certificate_works_and_without_it_is_refused() {
    let Some(etcd) = Etcd::start_tls() else {
        return;
    };
    let tls = etcd.tls.clone().unwrap();
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let env = MapEnv::from_pairs(&[
        ("ETCD_ENDPOINTS", &etcd.endpoint()),
        ("ETCD_CA_CERT_FILE", &ca),
        ("ETCD_CERT_FILE", &cert),
        ("ETCD_KEY_FILE", &key),
    ]);
    let cfg = DatastoreConfig::from_env(&env).unwrap();
    let client = Client::new(cfg.connect().await.unwrap());
    client.create(pool()).await.unwrap();
    assert!(
        etcd.etcdctl_value("/calico/resources/v3/projectcalico.org/ippools/tls-pool")
            .contains("10.70.0.0/16")
    );

    // Only the CA: the server demands a client certificate.
    let env = MapEnv::from_pairs(&[
        ("ETCD_ENDPOINTS", &etcd.endpoint()),
        ("ETCD_CA_CERT_FILE", &ca),
    ]);
    let mut cfg = DatastoreConfig::from_env(&env).unwrap();
    cfg.timeout = std::time::Duration::from_secs(3);
    let refused = match cfg.connect().await {
        Ok(ds) => Client::new(ds)
            .get::<IPPoolSpec>(None, "tls-pool")
            .await
            .unwrap_err()
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("unavailable") || refused.contains("error"),
        "{refused}"
    );

    // A certificate without its key is a configuration error, said plainly.
    let env = MapEnv::from_pairs(&[
        ("ETCD_ENDPOINTS", &etcd.endpoint()),
        ("ETCD_CA_CERT_FILE", &ca),
        ("ETCD_CERT_FILE", &cert),
    ]);
    let e = DatastoreConfig::from_env(&env)
        .unwrap()
        .connect()
        .await
        .err()
        .unwrap();
    assert_eq!(
        e,
        DatastoreError::Other("ETCD_CERT_FILE and ETCD_KEY_FILE must be given together".into())
    );
    // A missing file names the file.
    let env = MapEnv::from_pairs(&[
        ("ETCD_ENDPOINTS", &etcd.endpoint()),
        ("ETCD_CA_CERT_FILE", "/nonexistent/ca.pem"),
    ]);
    let e = DatastoreConfig::from_env(&env)
        .unwrap()
        .connect()
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("cannot read TLS file /nonexistent/ca.pem"),
        "{e}"
    );
}

#[tokio::test]
async fn several_endpoints_survive_one_being_down() {
    let Some(etcd) = Etcd::start() else { return };
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let env = MapEnv::from_pairs(&[("ETCD_ENDPOINTS", &format!("{dead},{}", etcd.endpoint()))]);
    let cfg = DatastoreConfig::from_env(&env).unwrap();
    assert_eq!(cfg.endpoints.len(), 2);
    let client = Client::new(cfg.connect().await.unwrap());
    for i in 0..10 {
        let p = IPPool::new(
            format!("p{i}"),
            IPPoolSpec {
                cidr: format!("10.{}.0.0/16", 80 + i),
                ..Default::default()
            },
        );
        client.create(p).await.unwrap();
    }
    assert_eq!(client.list::<IPPoolSpec>(None).await.unwrap().0.len(), 10);
}
