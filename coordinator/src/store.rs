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

use crate::registry::{Changes, RegistryState};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
/// Other durable records (the rollout), by name.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

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

/// The durable registry.
pub struct Store {
    db: Database,
    path: PathBuf,
}

fn instance_key(service: &str, address: &str) -> String {
    // NUL cannot appear in a validated service name or address.
    format!("{service}\0{address}")
}

impl Store {
    /// Opens (or creates) `dir/registry.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("registry.redb");
        let db = (|| -> Result<Database, redb::Error> {
            std::fs::create_dir_all(dir)?;
            let db = Database::create(&path)?;
            let tx = db.begin_write()?;
            tx.open_table(META)?;
            tx.open_table(SERVICES)?;
            tx.open_table(INSTANCES)?;
            tx.open_table(RECORDS)?;
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

    /// Writes `changes` as `revision` in one durable transaction.
    pub fn commit(&self, changes: &Changes, revision: u64) -> Result<(), StoreError> {
        let write = || -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            {
                let mut services = tx.open_table(SERVICES)?;
                let mut instances = tx.open_table(INSTANCES)?;
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
                    }
                }
                for s in &changes.services {
                    services.insert(s.name.as_str(), s.encode_to_vec().as_slice())?;
                }
                for (svc, addr) in &changes.removed_instances {
                    instances.remove(instance_key(svc, addr).as_str())?;
                }
                for i in &changes.instances {
                    instances.insert(instance_key(&i.service, &i.address).as_str(), i.encode_to_vec().as_slice())?;
                }
                tx.open_table(META)?.insert("revision", revision)?;
            }
            // Durability::Immediate (the default): fsync before commit returns.
            tx.commit()?;
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
