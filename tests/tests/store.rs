//! The object store under several receivers, against a real distributed store: a Ceph
//! cluster of three OSDs with three replicas per object and a RADOS gateway, started by the
//! test (`blkmirror_tests::ceph`).
//!
//! What the receivers will build on is proven here: a name taken by a conditional create is
//! never overwritten (a commit's manifest), and a volume's lease has exactly one holder when
//! receivers race for it, when its holder stops renewing (a receiver killed), and while a
//! store node is down.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blkmirror::dr::objstore::{
    Created, LeaseOutcome, ObjectStoreClient, StoreConfig, StoreError, lease_key,
};
use blkmirror_tests::{
    ceph::{ACCESS_KEY, CephCluster, SECRET_KEY},
    require_root,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

fn config(cluster: &CephCluster) -> StoreConfig {
    StoreConfig {
        endpoint: cluster.endpoint.clone(),
        bucket: "blkmirror".to_owned(),
        region: "us-east-1".to_owned(),
        access_key: ACCESS_KEY.to_owned(),
        secret_key: SECRET_KEY.to_owned(),
        allow_http: true,
    }
}

/// Whether the outcome says `who` holds the lease (someone else asked).
fn held_by(outcome: &LeaseOutcome, who: &str) -> bool {
    matches!(outcome, LeaseOutcome::Held { holder, .. } if holder == who)
}

fn holding(outcome: &LeaseOutcome) -> Option<(String, u64)> {
    match outcome {
        LeaseOutcome::Holding(record) => Some((record.holder.clone(), record.token)),
        _ => None,
    }
}

#[test]
fn conditional_writes_give_each_volume_one_writer_through_races_deaths_and_a_node_down() {
    require_root();
    let mut cluster = CephCluster::start();
    eprintln!(
        "Ceph (1 monitor, 3 OSDs, a gateway) started in {:.1} s",
        cluster.started_in.as_secs_f64()
    );
    cluster.create_bucket("blkmirror");
    // Every pool the gateway made keeps three replicas, on three different OSDs.
    let pools = cluster.pools();
    assert!(
        pools.iter().any(|pool| pool.contains("rgw")),
        "the gateway's pools: {pools:?}"
    );
    for pool in &pools {
        assert_eq!(cluster.pool_size(pool), 3, "replicas of pool {pool}");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let a = ObjectStoreClient::connect(&config(&cluster)).expect("client a");
    let b = ObjectStoreClient::connect(&config(&cluster)).expect("client b");

    runtime.block_on(async {
        // A name taken by a conditional create is never overwritten.
        let key = "volumes/v0/manifests/00000001";
        assert_eq!(
            a.put_if_absent(key, b"first".to_vec())
                .await
                .expect("create"),
            Created::Created
        );
        assert_eq!(
            b.put_if_absent(key, b"second".to_vec())
                .await
                .expect("create again"),
            Created::AlreadyExists
        );
        let (content, _) = a.get(key, 1024).await.expect("get").expect("present");
        assert_eq!(content, b"first");

        // Two receivers race for 20 fresh volumes: each volume gets exactly one holder, and
        // the loser learns it (a lost race, or the winner's lease).
        let mut wins = [0u32; 2];
        for round in 0..20 {
            let volume = format!("race-{round}");
            let now = now_ms();
            let (ra, rb) = tokio::join!(
                a.acquire_lease(&volume, "receiver-a", now, 30_000),
                b.acquire_lease(&volume, "receiver-b", now, 30_000)
            );
            let (ra, rb) = (ra.expect("a's attempt"), rb.expect("b's attempt"));
            let holders: Vec<_> = [&ra, &rb].into_iter().filter_map(holding).collect();
            assert_eq!(holders.len(), 1, "round {round}: a {ra:?}, b {rb:?}");
            let winner = &holders[0].0;
            wins[usize::from(winner == "receiver-b")] += 1;
            // Whoever asks now is told the winner holds it.
            let later = a
                .acquire_lease(&volume, "receiver-c", now_ms(), 30_000)
                .await
                .expect("a third receiver's attempt");
            assert!(held_by(&later, winner), "round {round}: {later:?}");
        }
        eprintln!("races won: receiver-a {}, receiver-b {}", wins[0], wins[1]);

        // A holder renews (same token); another receiver cannot take it before it expires.
        let volume = "v1";
        let taken = a
            .acquire_lease(volume, "receiver-a", now_ms(), 2_000)
            .await
            .expect("take");
        assert_eq!(holding(&taken), Some(("receiver-a".to_owned(), 1)));
        let renewed = a
            .acquire_lease(volume, "receiver-a", now_ms(), 2_000)
            .await
            .expect("renew");
        assert_eq!(holding(&renewed), Some(("receiver-a".to_owned(), 1)));
        let refused = b
            .acquire_lease(volume, "receiver-b", now_ms(), 2_000)
            .await
            .expect("try");
        assert!(held_by(&refused, "receiver-a"), "{refused:?}");

        // Receiver a dies holding it (it renews no more): once the lease ends, b takes it over
        // with a raised token, and a, back, cannot renew it.
        tokio::time::sleep(Duration::from_millis(2_200)).await;
        let took_over = b
            .acquire_lease(volume, "receiver-b", now_ms(), 30_000)
            .await
            .expect("take over");
        assert_eq!(holding(&took_over), Some(("receiver-b".to_owned(), 2)));
        let back = a
            .acquire_lease(volume, "receiver-a", now_ms(), 30_000)
            .await
            .expect("a back");
        assert!(held_by(&back, "receiver-b"), "{back:?}");
    });

    // A store node dies: with three replicas and two required, the store goes on.
    cluster.kill_osd(0);
    runtime.block_on(async {
        let renewed = b
            .acquire_lease("v1", "receiver-b", now_ms(), 30_000)
            .await
            .expect("renew with a node down");
        assert_eq!(holding(&renewed), Some(("receiver-b".to_owned(), 2)));
        assert_eq!(
            a.put_if_absent("volumes/v0/manifests/00000002", b"next".to_vec())
                .await
                .expect("create with a node down"),
            Created::Created
        );
        let (lease, _) = a
            .get(&lease_key("v1"), 4096)
            .await
            .expect("read")
            .expect("present");
        assert!(String::from_utf8_lossy(&lease).contains("receiver-b"));
    });

    // Plain HTTP needs saying so; a wrong secret is refused by the store with its reason.
    let insecure = StoreConfig {
        allow_http: false,
        ..config(&cluster)
    };
    let error = ObjectStoreClient::connect(&insecure).expect_err("http refused");
    assert!(error.to_string().contains("allow_http"), "{error}");
    let wrong = StoreConfig {
        secret_key: "wrong".to_owned(),
        ..config(&cluster)
    };
    let client = ObjectStoreClient::connect(&wrong).expect("client");
    let refused = runtime.block_on(client.put_if_absent("x", b"x".to_vec()));
    assert!(
        matches!(refused, Err(StoreError::Request { .. })),
        "{refused:?}"
    );
}
