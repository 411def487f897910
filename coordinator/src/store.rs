//! The coordinator's durable state: an embedded transactional store (redb).
//!
//! One write transaction per registry change, committed with fsync before the change
//! is acknowledged or published: a SIGKILL at any moment loses no acknowledged write,
//! and the revision on disk never goes backwards. Rows are the protobuf encodings of
//! the API messages, so the store follows the API's compatibility rules.

use std::path::{Path, PathBuf};

use hitless_proto::v1 as pb;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::registry::{Changes, Key, RegistryState};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
/// Other durable records (the rollout), by name.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Tombstones: when each stopped instance kept `down` is due for removal (wall clock,
/// milliseconds since the Unix epoch), by instance.
const TOMBSTONES: TableDefinition<&str, u64> = TableDefinition::new("tombstones");
/// The node roster: every node whose agent said hello and that was not removed since,
/// with its last contact (wall clock, milliseconds since the Unix epoch).
const NODES: TableDefinition<&str, u64> = TableDefinition::new("nodes");

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("store {path}: {source}")]
    Db {
        /// Database file.
        path: PathBuf,
        /// Cause.
        source: redb::Error,
    },
    /// A row does not decode.
    #[error("store {path}: row {key:?} of table {table} is corrupt: {source}")]
    Corrupt {
        /// Database file.
        path: PathBuf,
        /// Table.
        table: &'static str,
        /// Row key.
        key: String,
        /// Cause.
        source: prost::DecodeError,
    },
}

/// A fail point (README "Failpoints"), compiled in only with the `failpoints` feature:
/// without it this expands to nothing. `failpoint!(NAME)` panics or sleeps as `FAILPOINTS`
/// says; `failpoint!(NAME, |fp| ERR)` also makes `return` the enclosing function's
/// `Err(ERR)` (`fp` is the point's name); `failpoint!(NAME, break)` leaves the enclosing
/// loop.
#[doc(hidden)]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        ::fail::fail_point!($name);
    };
    ($name:literal, break) => {
        #[cfg(feature = "failpoints")]
        if ::fail::eval($name, |_| ()).is_some() {
            break;
        }
    };
    ($name:literal, |$fp:ident| $err:expr) => {
        #[cfg(feature = "failpoints")]
        ::fail::fail_point!($name, |_| {
            let $fp: &'static str = $name;
            Err($err)
        });
    };
}

/// Configures the fail points from `FAILPOINTS` (`name=action;...`, fail's syntax), once
/// per process, and makes a panic anywhere end the process (as a crash would: a panic
/// in a task, the rollout engine's say, would otherwise leave the coordinator up without
/// it). Only with the `failpoints` feature (without it, neither this nor any fail point exists).
#[cfg(feature = "failpoints")]
pub fn failpoints_setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The scenario lives as long as the process (its drop would clear the points).
        std::mem::forget(fail::FailScenario::setup());
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            std::process::exit(101);
        }));
    });
}

/// The I/O error a fail point injects into a store write, naming it.
#[cfg(feature = "failpoints")]
fn injected(fp: &str) -> redb::Error {
    redb::Error::Io(std::io::Error::other(format!("injected by failpoint {fp}")))
}

/// The durable registry.
pub struct Store {
    db: Database,
    path: PathBuf,
}

fn instance_key(service: &str, address: &str) -> String {
    // NUL cannot appear in a validated service name or address.
    format!("{service}\0{address}")
}

/// A tombstone: the instance kept `down`, and when it is due for removal (milliseconds
/// since the Unix epoch).
pub type Tombstone = (Key, u64);

impl Store {
    /// Opens (or creates) `dir/registry.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // The store opens first: fail points are set before any boundary.
        #[cfg(feature = "failpoints")]
        failpoints_setup();
        let path = dir.join("registry.redb");
        let db = (|| -> Result<Database, redb::Error> {
            std::fs::create_dir_all(dir)?;
            let db = Database::create(&path)?;
            let tx = db.begin_write()?;
            tx.open_table(META)?;
            tx.open_table(SERVICES)?;
            tx.open_table(INSTANCES)?;
            tx.open_table(RECORDS)?;
            tx.open_table(TOMBSTONES)?;
            tx.open_table(NODES)?;
            tx.commit()?;
            Ok(db)
        })()
        .map_err(|source| StoreError::Db { path: path.clone(), source })?;
        Ok(Self { db, path })
    }

    fn db_err(&self) -> impl FnOnce(redb::Error) -> StoreError + '_ {
        |source| StoreError::Db { path: self.path.clone(), source }
    }

    /// The registry as last committed.
    pub fn load(&self) -> Result<RegistryState, StoreError> {
        let read = || -> Result<_, redb::Error> {
            let tx = self.db.begin_read()?;
            let revision = tx.open_table(META)?.get("revision")?.map_or(0, |v| v.value());
            let mut services = Vec::new();
            for row in tx.open_table(SERVICES)?.iter()? {
                let (k, v) = row?;
                services.push((k.value().to_owned(), v.value().to_vec()));
            }
            let mut instances = Vec::new();
            for row in tx.open_table(INSTANCES)?.iter()? {
                let (k, v) = row?;
                instances.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok((revision, services, instances))
        };
        let (revision, services, instances) = read().map_err(self.db_err())?;
        let corrupt = |table, key: String| {
            let path = self.path.clone();
            move |source| StoreError::Corrupt { path, table, key, source }
        };
        let services = services
            .into_iter()
            .map(|(k, v)| pb::Service::decode(v.as_slice()).map_err(corrupt("services", k)))
            .collect::<Result<Vec<_>, _>>()?;
        let instances = instances
            .into_iter()
            .map(|(k, v)| pb::Instance::decode(v.as_slice()).map_err(corrupt("instances", k)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RegistryState::from_parts(revision, services, instances))
    }

    /// Writes `changes` as `revision` in one durable transaction. A tombstone goes with
    /// its instance: removed with it, and when the instance is written in another state
    /// than `down` (its address came back).
    pub fn commit(&self, changes: &Changes, revision: u64) -> Result<(), StoreError> {
        self.commit_burying(changes, revision, None)
    }

    /// Like [`Store::commit`], and records `buried` in the same transaction (the change
    /// that marks it down).
    pub fn commit_burying(
        &self,
        changes: &Changes,
        revision: u64,
        buried: Option<&Tombstone>,
    ) -> Result<(), StoreError> {
        let write = || -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            {
                let mut services = tx.open_table(SERVICES)?;
                let mut instances = tx.open_table(INSTANCES)?;
                let mut tombstones = tx.open_table(TOMBSTONES)?;
                for name in &changes.removed_services {
                    services.remove(name.as_str())?;
                    let prefix = format!("{name}\0");
                    let doomed: Vec<String> = instances
                        .range(prefix.as_str()..)?
                        .map(|r| r.map(|(k, _)| k.value().to_owned()))
                        .take_while(|k| k.as_ref().map_or(true, |k| k.starts_with(&prefix)))
                        .collect::<Result<_, _>>()?;
                    for k in doomed {
                        instances.remove(k.as_str())?;
                        tombstones.remove(k.as_str())?;
                    }
                }
                for s in &changes.services {
                    services.insert(s.name.as_str(), s.encode_to_vec().as_slice())?;
                }
                for (svc, addr) in &changes.removed_instances {
                    instances.remove(instance_key(svc, addr).as_str())?;
                    tombstones.remove(instance_key(svc, addr).as_str())?;
                }
                for i in &changes.instances {
                    let key = instance_key(&i.service, &i.address);
                    instances.insert(key.as_str(), i.encode_to_vec().as_slice())?;
                    if i.state() != pb::InstanceState::Down {
                        tombstones.remove(key.as_str())?;
                    }
                }
                if let Some(((svc, addr), due)) = buried {
                    tombstones.insert(instance_key(svc, addr).as_str(), *due)?;
                }
                tx.open_table(META)?.insert("revision", revision)?;
            }
            crate::failpoint!("store.commit.before_fsync", |fp| injected(fp));
            // Durability::Immediate (the default): fsync before commit returns.
            tx.commit()?;
            // Durable; the caller has not applied or published it yet.
            crate::failpoint!("store.commit.after_fsync");
            Ok(())
        };
        write().map_err(self.db_err())
    }
}

impl Store {
    /// Stores a named record durably (fsync before returning).
    pub fn put_record(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let write = || -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            tx.open_table(RECORDS)?.insert(name, bytes)?;
            crate::failpoint!("store.put_record.before_fsync", |fp| injected(fp));
            tx.commit()?;
            Ok(())
        };
        write().map_err(self.db_err())
    }

    /// A named record, if stored.
    pub fn record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(RECORDS)?;
            let v = t.get(name)?.map(|v| v.value().to_vec());
            Ok(v)
        };
        read().map_err(self.db_err())
    }
}

impl Store {
    /// Every tombstone stored.
    pub fn tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        let read = || -> Result<Vec<Tombstone>, redb::Error> {
            let tx = self.db.begin_read()?;
            let mut out = Vec::new();
            for row in tx.open_table(TOMBSTONES)?.iter()? {
                let (k, v) = row?;
                if let Some((svc, addr)) = k.value().split_once('\0') {
                    out.push(((svc.to_owned(), addr.to_owned()), v.value()));
                }
            }
            Ok(out)
        };
        read().map_err(self.db_err())
    }

    /// Records (or moves) the tombstone of `key`, due at `due` (ms since the epoch).
    pub fn put_tombstone(&self, key: &Key, due: u64) -> Result<(), StoreError> {
        self.write_row(TOMBSTONES, &instance_key(&key.0, &key.1), Some(due))
    }

    /// Forgets the tombstone of `key`.
    pub fn remove_tombstone(&self, key: &Key) -> Result<(), StoreError> {
        self.write_row(TOMBSTONES, &instance_key(&key.0, &key.1), None)
    }

    /// The node roster: each node with its last contact (ms since the epoch).
    pub fn nodes(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let read = || -> Result<Vec<(String, u64)>, redb::Error> {
            let tx = self.db.begin_read()?;
            let mut out = Vec::new();
            for row in tx.open_table(NODES)?.iter()? {
                let (k, v) = row?;
                out.push((k.value().to_owned(), v.value()));
            }
            Ok(out)
        };
        read().map_err(self.db_err())
    }

    /// Adds `node` to the roster, or records its last contact.
    pub fn put_node(&self, node: &str, last_contact: u64) -> Result<(), StoreError> {
        self.write_row(NODES, node, Some(last_contact))
    }

    /// Records the last contact of each of `nodes` (adding those not in the roster), in
    /// one transaction.
    pub fn put_nodes(&self, nodes: &[(String, u64)]) -> Result<(), StoreError> {
        let write = || -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(NODES)?;
                for (node, at) in nodes {
                    t.insert(node.as_str(), *at)?;
                }
            }
            crate::failpoint!("store.put_nodes.before_fsync", |fp| injected(fp));
            tx.commit()?;
            Ok(())
        };
        write().map_err(self.db_err())
    }

    /// Retires `node` from the roster.
    pub fn remove_node(&self, node: &str) -> Result<(), StoreError> {
        self.write_row(NODES, node, None)
    }

    /// Inserts (`Some`) or removes (`None`) one row, durably.
    fn write_row(&self, table: TableDefinition<&str, u64>, key: &str, value: Option<u64>) -> Result<(), StoreError> {
        let write = || -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(table)?;
                match value {
                    Some(v) => {
                        t.insert(key, v)?;
                    }
                    None => {
                        t.remove(key)?;
                    }
                }
            }
            crate::failpoint!("store.write_row.before_fsync", |fp| injected(fp));
            tx.commit()?;
            Ok(())
        };
        write().map_err(self.db_err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_committed_is_what_is_loaded() {
        let dir = std::env::temp_dir().join(format!("hitless-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut state = RegistryState::default();
        {
            let store = Store::open(&dir).unwrap();
            for addr in ["127.0.1.1:80", "127.0.1.2:80"] {
                let i = pb::Instance { service: "cart".into(), address: addr.into(), weight: 7, ..Default::default() };
                let c = state.register(&i).unwrap();
                store.commit(&c, state.revision() + 1).unwrap();
                state.commit(&c);
            }
            let c = state.deregister(&("cart".into(), "127.0.1.1:80".into())).unwrap();
            store.commit(&c, state.revision() + 1).unwrap();
            state.commit(&c);
        }
        let loaded = Store::open(&dir).unwrap().load().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.revision(), 3);
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.record("rollout").unwrap(), None);
        store.put_record("rollout", b"{}").unwrap();
        drop(store);
        assert_eq!(Store::open(&dir).unwrap().record("rollout").unwrap().as_deref(), Some(&b"{}"[..]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
