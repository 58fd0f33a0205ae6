//! The Docker plugin's records in the store: pools given to Docker and which Docker network is
//! which ferrynet network (types and keys in `ferrynet_model::docker`).

use ferrynet_model::docker::{
    network_key, networks_prefix, pool_key, pools_prefix, DockerNetwork, PoolRecord,
};
use ferrynet_store::{Compare, Op};

use super::{decode, decode_all, encode, Control};
use crate::error::Result;

impl Control {
    /// A pool record with its revision.
    pub async fn docker_pool(&self, pool_id: &str) -> Result<Option<(PoolRecord, u64)>> {
        match self.store.get(&pool_key(pool_id)).await? {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every pool record.
    pub async fn docker_pools(&self) -> Result<Vec<PoolRecord>> {
        let (kvs, _) = self.store.range(&pools_prefix()).await?;
        Ok(decode_all(&kvs))
    }

    /// Give a pool to Docker; false when it is given already.
    pub async fn claim_docker_pool(&self, pool_id: &str, rec: &PoolRecord) -> Result<bool> {
        let key = pool_key(pool_id);
        let res = self
            .store
            .txn(
                vec![Compare::Missing(key.clone())],
                vec![Op::put(key, encode(rec))],
            )
            .await?;
        Ok(res.succeeded)
    }

    /// Rewrite a pool record if it did not change since `rev`; false when it did.
    pub async fn update_docker_pool(
        &self,
        pool_id: &str,
        rec: &PoolRecord,
        rev: u64,
    ) -> Result<bool> {
        let key = pool_key(pool_id);
        let res = self
            .store
            .txn(
                vec![Compare::ModRevision(key.clone(), rev)],
                vec![Op::put(key, encode(rec))],
            )
            .await?;
        Ok(res.succeeded)
    }

    /// Forget a pool.
    pub async fn release_docker_pool(&self, pool_id: &str) -> Result<()> {
        self.store.delete(&pool_key(pool_id)).await?;
        Ok(())
    }

    /// A Docker network's binding.
    pub async fn docker_binding(&self, docker_id: &str) -> Result<Option<DockerNetwork>> {
        match self.store.get(&network_key(docker_id)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Every binding.
    pub async fn docker_bindings(&self) -> Result<Vec<DockerNetwork>> {
        let (kvs, _) = self.store.range(&networks_prefix()).await?;
        Ok(decode_all(&kvs))
    }

    /// Record a new binding and, in the same transaction, the pools' records naming its
    /// network, each only if unchanged since its revision; false when anything changed.
    pub async fn bind_docker_network(
        &self,
        binding: &DockerNetwork,
        pools: &[(PoolRecord, u64)],
    ) -> Result<bool> {
        let key = network_key(&binding.docker_id);
        let mut compares = vec![Compare::Missing(key.clone())];
        let mut ops = vec![Op::put(key, encode(binding))];
        for (rec, rev) in pools {
            let mut rec = rec.clone();
            rec.network = Some(binding.name.clone());
            let k = pool_key(&rec.pool.to_string());
            compares.push(Compare::ModRevision(k.clone(), *rev));
            ops.push(Op::put(k, encode(&rec)));
        }
        Ok(self.store.txn(compares, ops).await?.succeeded)
    }

    /// Forget a Docker network's binding.
    pub async fn unbind_docker_network(&self, docker_id: &str) -> Result<()> {
        self.store.delete(&network_key(docker_id)).await?;
        Ok(())
    }
}
