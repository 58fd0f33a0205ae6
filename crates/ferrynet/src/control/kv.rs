//! Free-form keys for templates (`ferrynet kv`), under `kv/` in the store.

use ferrynet_model::service::keys;

use super::Control;
use crate::error::Result;

impl Control {
    /// Set a key.
    pub async fn kv_set(&self, name: &str, value: Vec<u8>) -> Result<()> {
        self.store.put(&keys::kv(name), value).await?;
        Ok(())
    }

    /// A key's value.
    pub async fn kv_get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.store.get(&keys::kv(name)).await?.map(|kv| kv.value))
    }

    /// Remove a key; false when it was not set.
    pub async fn kv_remove(&self, name: &str) -> Result<bool> {
        Ok(self.store.delete(&keys::kv(name)).await?)
    }

    /// Every key with its value, sorted by name.
    pub async fn kv_list(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let (kvs, _) = self.store.range(&keys::kvs()).await?;
        Ok(kvs
            .into_iter()
            .map(|kv| {
                let name = kv
                    .key
                    .strip_prefix(&keys::kvs())
                    .unwrap_or(&kv.key)
                    .to_string();
                (name, kv.value)
            })
            .collect())
    }
}
