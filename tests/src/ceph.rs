//! A throwaway Ceph cluster for the object-store work: one monitor, three OSDs (BlueStore on
//! sparse files) and a RADOS gateway, all on 127.0.0.1, with pools of three replicas placed
//! on three different OSDs. Everything lives in one scratch directory; the daemons run in the
//! foreground as children of the test and are killed, and the directory removed, on drop.
//!
//! The daemons are Debian's (`ceph-mon`, `ceph-osd`, `radosgw`; `cargo xtask setup` installs
//! them). No manager daemon is started: the gateway and the replication do not need one, and
//! the cluster then reports `HEALTH_WARN` for it, which [`CephCluster::start`] accepts.

use std::{
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Scratch,
    mirror::{ChildGuard, free_port},
};

/// The S3 user every cluster is made with.
pub const ACCESS_KEY: &str = "BLKMIRRORTESTKEY0001";
/// Its secret.
pub const SECRET_KEY: &str = "blkmirror-test-secret-key-not-for-production";

/// A running cluster; stopped and removed on drop.
pub struct CephCluster {
    /// The gateway's S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// `ceph.conf` of the cluster (for `ceph -c`).
    pub conf: PathBuf,
    /// The OSD daemons, by id (`None` once killed by [`Self::kill_osd`]).
    osds: Vec<Option<ChildGuard>>,
    /// The monitor.
    others: Vec<ChildGuard>,
    /// The RADOS gateway (`None` while stopped by [`Self::stop_gateway`]).
    gateway: Option<ChildGuard>,
    /// Its port.
    rgw_port: u16,
    /// How long [`Self::start`] took.
    pub started_in: Duration,
    scratch: Scratch,
}

/// Runs a Ceph tool and returns its output, panicking with its stderr on failure.
fn tool(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (the object-store tests need Ceph: cargo xtask setup)")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn spawn(program: &str, args: &[&str], log: &Path) -> ChildGuard {
    let log = fs::File::create(log).expect("daemon log");
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (the object-store tests need Ceph: cargo xtask setup)")
        });
    ChildGuard(child)
}

fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "Ceph: {what} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Where the OSDs keep their objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OsdStore {
    /// BlueStore on a 2 GiB file each, on the scratch file system (as a real cluster keeps
    /// them on disks).
    #[default]
    Disk,
    /// MemStore, in the OSDs' memory (up to 4 GiB each): a store that is not bound by this
    /// machine's one disk, to measure what the receivers themselves sustain. Its objects do
    /// not survive an OSD's restart.
    Memory,
}

impl OsdStore {
    /// `disk` or `memory` (as the benches' variables name it).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "disk" => Some(Self::Disk),
            "memory" => Some(Self::Memory),
            _ => None,
        }
    }

    /// The OSDs' part of `ceph.conf`.
    fn conf(self) -> &'static str {
        match self {
            Self::Disk => {
                "osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 2147483648
osd_memory_target = 939524096
bluestore_cache_autotune = false
bluestore_cache_size = 134217728"
            }
            Self::Memory => {
                "osd_objectstore = memstore
memstore_device_bytes = 4294967296"
            }
        }
    }
}

impl CephCluster {
    /// The process ids of its running OSDs and gateway, named (`osd.0`, `radosgw`).
    pub fn daemon_pids(&self) -> Vec<(String, u32)> {
        let mut pids: Vec<(String, u32)> = self
            .osds
            .iter()
            .enumerate()
            .filter_map(|(id, osd)| Some((format!("osd.{id}"), osd.as_ref()?.0.id())))
            .collect();
        if let Some(gateway) = &self.gateway {
            pids.push(("radosgw".into(), gateway.0.id()));
        }
        pids
    }

    /// Makes and starts a cluster with BlueStore OSDs; panics (with the daemons' logs named)
    /// if it does not come up within two minutes.
    pub fn start() -> Self {
        Self::start_on(OsdStore::Disk)
    }

    /// [`Self::start`] with the OSDs' objects kept as `store` says.
    pub fn start_on(store: OsdStore) -> Self {
        let begun = Instant::now();
        let scratch = Scratch::new();
        let dir = scratch.path.clone();
        for sub in ["run", "log", "mon/ceph-a", "osd", "rgw"] {
            fs::create_dir_all(dir.join(sub)).expect("cluster directory");
        }
        let d = dir.display();
        let mon_port = free_port();
        let rgw_port = free_port();
        let fsid = uuid();
        let osd_store = store.conf();
        let conf = dir.join("ceph.conf");
        fs::write(
            &conf,
            format!(
                "[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
mon_initial_members = a
public_network = 127.0.0.0/8
ms_bind_msgr1 = false
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {d}/admin.keyring
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
osd_pool_default_size = 3
osd_pool_default_min_size = 2
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data = {d}/mon/ceph-$id
[mon]
keyring = {d}/mon.keyring
[osd]
osd_data = {d}/osd/ceph-$id
keyring = {d}/osd/ceph-$id/keyring
{osd_store}
[client.rgw.a]
keyring = {d}/rgw.keyring
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_data = {d}/rgw
rgw_dns_name = 127.0.0.1
"
            ),
        )
        .expect("ceph.conf");
        let c = conf.to_str().expect("utf-8 path").to_owned();
        let path = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();

        // Keys: the monitor's, and the admin's (known to the monitor from its first start).
        tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                &path("mon.keyring"),
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        );
        tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                &path("admin.keyring"),
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ],
        );
        tool(
            "ceph-authtool",
            &[
                &path("mon.keyring"),
                "--import-keyring",
                &path("admin.keyring"),
            ],
        );
        tool(
            "monmaptool",
            &[
                "--create",
                "--addv",
                "a",
                &format!("[v2:127.0.0.1:{mon_port}]"),
                "--fsid",
                &fsid,
                &path("monmap"),
            ],
        );
        tool(
            "ceph-mon",
            &[
                "-c",
                &c,
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                &path("monmap"),
                "--keyring",
                &path("mon.keyring"),
            ],
        );
        let others = vec![spawn(
            "ceph-mon",
            &["-c", &c, "-i", "a", "-f"],
            &dir.join("log/mon.a.out"),
        )];
        let mut cluster = Self {
            endpoint: format!("http://127.0.0.1:{rgw_port}"),
            conf: conf.clone(),
            osds: Vec::new(),
            others: Vec::new(),
            gateway: None,
            rgw_port: 0,
            started_in: Duration::ZERO,
            scratch,
        };
        wait_until("the monitor answers", Duration::from_secs(60), || {
            cluster.try_ceph(&["mon", "stat"]).is_some()
        });

        for _ in 0..3 {
            let osd_uuid = uuid();
            let id = cluster.ceph(&["osd", "new", &osd_uuid]).trim().to_owned();
            let osd_dir = dir.join(format!("osd/ceph-{id}"));
            fs::create_dir_all(&osd_dir).expect("osd directory");
            // Its key first: `--mkfs` already asks the monitor for the configuration.
            let keyring = osd_dir.join("keyring");
            let keyring = keyring.to_str().expect("utf-8 path");
            tool(
                "ceph-authtool",
                &[
                    "--create-keyring",
                    keyring,
                    "--gen-key",
                    "-n",
                    &format!("osd.{id}"),
                ],
            );
            cluster.ceph(&[
                "auth",
                "add",
                &format!("osd.{id}"),
                "osd",
                "allow *",
                "mon",
                "allow profile osd",
                "mgr",
                "allow profile osd",
                "-i",
                keyring,
            ]);
            tool(
                "ceph-osd",
                &["-c", &c, "-i", &id, "--mkfs", "--osd-uuid", &osd_uuid],
            );
            cluster.osds.push(Some(spawn(
                "ceph-osd",
                &["-c", &c, "-i", &id, "-f"],
                &dir.join(format!("log/osd.{id}.out")),
            )));
        }
        wait_until("three OSDs up and in", Duration::from_secs(90), || {
            cluster.osds_up() == 3
        });

        cluster.ceph(&[
            "auth",
            "get-or-create",
            "client.rgw.a",
            "mon",
            "allow rw",
            "osd",
            "allow rwx",
            "-o",
            &path("rgw.keyring"),
        ]);
        cluster.others = others;
        cluster.rgw_port = rgw_port;
        cluster.start_gateway();
        tool(
            "radosgw-admin",
            &[
                "-c",
                &c,
                "user",
                "create",
                "--uid",
                "blkmirror",
                "--display-name",
                "blkmirror tests",
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ],
        );
        cluster.started_in = begun.elapsed();
        cluster
    }

    /// `ceph -c CONF ARGS`, its standard output; panics on failure.
    pub fn ceph(&self, args: &[&str]) -> String {
        let conf = self.conf.to_str().expect("utf-8 path");
        let mut all = vec!["-c", conf, "--connect-timeout", "20"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&tool("ceph", &all).stdout).into_owned()
    }

    /// `ceph` that may fail (`None`), with a short timeout.
    pub fn try_ceph(&self, args: &[&str]) -> Option<String> {
        let conf = self.conf.to_str().expect("utf-8 path");
        let output = Command::new("ceph")
            .args(["-c", conf, "--connect-timeout", "3"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// OSDs the monitor counts as up.
    pub fn osds_up(&self) -> u64 {
        self.try_ceph(&["osd", "stat", "--format", "json"])
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|stat| stat["num_up_osds"].as_u64())
            .unwrap_or(0)
    }

    /// The replica count of a pool.
    pub fn pool_size(&self, pool: &str) -> u64 {
        let text = self.ceph(&["osd", "pool", "get", pool, "size", "--format", "json"]);
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|value| value["size"].as_u64())
            .unwrap_or_else(|| panic!("pool size of {pool}: {text}"))
    }

    /// The pools the cluster has.
    pub fn pools(&self) -> Vec<String> {
        self.ceph(&["osd", "pool", "ls"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Starts the RADOS gateway (again) and waits until it listens: the store reachable.
    pub fn start_gateway(&mut self) {
        if self.gateway.is_some() {
            return;
        }
        let conf = self.conf.to_str().expect("utf-8 path").to_owned();
        let log = self.dir().join("log/rgw.a.out");
        let log = if log.exists() {
            self.dir().join("log/rgw.a.restarted.out")
        } else {
            log
        };
        self.gateway = Some(spawn(
            "radosgw",
            &["-c", &conf, "-n", "client.rgw.a", "-f"],
            &log,
        ));
        let port = self.rgw_port;
        wait_until("the gateway listens", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Kills the RADOS gateway (SIGKILL): the store unreachable, its data intact.
    pub fn stop_gateway(&mut self) {
        if let Some(mut gateway) = self.gateway.take() {
            let _ = gateway.0.kill();
            let _ = gateway.0.wait();
        }
    }

    /// Kills OSD `id` (SIGKILL), as a store node dying.
    pub fn kill_osd(&mut self, id: usize) {
        if let Some(mut osd) = self.osds.get_mut(id).and_then(Option::take) {
            let _ = osd.0.kill();
            let _ = osd.0.wait();
        }
    }

    /// Creates bucket `name` through the gateway (with `s3cmd`, a real S3 client: the
    /// receivers expect the operator to have made their bucket).
    pub fn create_bucket(&self, name: &str) {
        let host = self.endpoint.trim_start_matches("http://");
        tool(
            "s3cmd",
            &[
                "--config=/dev/null",
                &format!("--access_key={ACCESS_KEY}"),
                &format!("--secret_key={SECRET_KEY}"),
                &format!("--host={host}"),
                &format!("--host-bucket={host}"),
                "--no-ssl",
                "--region=us-east-1",
                "mb",
                &format!("s3://{name}"),
            ],
        );
    }

    /// A client configuration of `bucket` with the cluster's S3 user.
    pub fn store_config(&self, bucket: &str) -> blkmirror::dr::objstore::StoreConfig {
        blkmirror::dr::objstore::StoreConfig {
            endpoint: self.endpoint.clone(),
            bucket: bucket.to_owned(),
            region: "us-east-1".to_owned(),
            access_key: ACCESS_KEY.to_owned(),
            secret_key: SECRET_KEY.to_owned(),
            allow_http: true,
            lease: blkmirror::dr::objstore::DEFAULT_LEASE,
            gc_every: None,
            gc_grace: blkmirror::dr::objstore::DEFAULT_GC_GRACE,
            takeover_settle: blkmirror::dr::objstore::DEFAULT_TAKEOVER_SETTLE,
            encryption_key: None,
        }
    }

    /// Flips one byte of the stored chunk that the newest point of `volume` in `bucket` reads
    /// at offset 0, in its pack (a conditional replace, as a disk's bit rot would not be).
    pub fn damage_first_chunk_of_newest_point(&self, bucket: &str, volume: &str) {
        use blkmirror::dr::{layout, objpoints};
        self.with_bucket(bucket, async |client| {
            let newest = *objpoints::list_points(client, volume)
                .await
                .expect("points")
                .last()
                .expect("a point");
            let (map, _) = objpoints::read_point(client, volume, newest)
                .await
                .expect("the newest point");
            let view = objpoints::load_view(client).await.expect("view");
            let id = map.chunks.get(&0).expect("chunk 0 holds data");
            let (pack, entry) = view.locations.get(id).expect("chunk 0's pack");
            let key = layout::pack_key(&pack);
            let (mut bytes, e_tag) = client
                .get(&key, 1 << 30)
                .await
                .expect("pack")
                .expect("the pack exists");
            bytes[entry.offset as usize + 10] ^= 0xff;
            assert!(
                client
                    .replace_if_unchanged(&key, bytes, &e_tag.expect("an ETag"))
                    .await
                    .expect("replace"),
                "the pack changed meanwhile"
            );
        });
    }

    /// Runs `work` with a client of `bucket`, on a runtime of its own (for tests that are
    /// not async themselves), as an operator with the store's credentials could.
    pub fn with_bucket<T>(
        &self,
        bucket: &str,
        work: impl AsyncFnOnce(&blkmirror::dr::objstore::ObjectStoreClient) -> T,
    ) -> T {
        let client =
            blkmirror::dr::objstore::ObjectStoreClient::connect(&self.store_config(bucket))
                .expect("client");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work(&client))
    }

    /// The object `key` of `bucket`, if there is one.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.with_bucket(bucket, async |client| {
            client
                .get(key, 1 << 30)
                .await
                .expect("reading the object")
                .map(|(bytes, _)| bytes)
        })
    }

    /// Writes a `[store]` credentials file of the cluster's S3 user (with `secret`) at `path`,
    /// with `mode`.
    pub fn write_credentials(&self, path: &Path, secret: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        fs::write(
            path,
            format!("access_key = \"{ACCESS_KEY}\"\nsecret_key = \"{secret}\"\n"),
        )
        .expect("credentials");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// The scratch directory (logs under `log/`).
    pub fn dir(&self) -> &Path {
        &self.scratch.path
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        // Every daemon dies at once (SIGKILL; ChildGuard reaps it): the cluster is thrown away.
        drop(self.gateway.take());
        while let Some(child) = self.others.pop() {
            drop(child);
        }
        for osd in self.osds.drain(..) {
            drop(osd);
        }
    }
}

/// A random UUID from the kernel.
fn uuid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("/proc/sys/kernel/random/uuid")
        .trim()
        .to_owned()
}
