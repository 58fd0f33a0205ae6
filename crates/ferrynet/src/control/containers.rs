//! CLI containers' records in the store (`containers/<name>`); the processes themselves are
//! `crate::container`'s.

use ferrynet_model::network::keys;
use ferrynet_store::{Compare, Op};

use super::{decode, decode_all, encode, Control};
use crate::container::Container;
use crate::error::{ControlError, Result};

impl Control {
    /// Every CLI container.
    pub async fn containers(&self) -> Result<Vec<Container>> {
        let (kvs, _) = self.store.range(&keys::containers()).await?;
        Ok(decode_all(&kvs))
    }

    /// One CLI container.
    pub async fn container(&self, name: &str) -> Result<Option<Container>> {
        match self.store.get(&keys::container(name)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Record a new container; fails if the name is taken.
    pub async fn claim_container(&self, c: &Container) -> Result<()> {
        let key = keys::container(&c.name);
        let r = self
            .store
            .txn(
                vec![Compare::Missing(key.clone())],
                vec![Op::put(key, encode(c))],
            )
            .await?;
        if !r.succeeded {
            return Err(ControlError::InvalidConfig(format!(
                "a container named {} already exists",
                c.name
            )));
        }
        Ok(())
    }

    /// Overwrite a container record.
    pub async fn save_container(&self, c: &Container) -> Result<()> {
        self.store.put(&keys::container(&c.name), encode(c)).await?;
        Ok(())
    }

    /// Forget a container record.
    pub async fn forget_container(&self, name: &str) -> Result<()> {
        self.store.delete(&keys::container(name)).await?;
        Ok(())
    }
}
