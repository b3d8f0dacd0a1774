//! [`Policed`]: a `Runtime` that applies the policy to every container and build before
//! the engine sees it, whatever built the spec. Step limits are applied here too: a step
//! may ask for less than the policy's limit, never for more.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Policy;
use crate::runtime::{
    BuildOutput, BuildSpec, ContainerSpec, Credential, ImageIdentity, Limits, LogSink, PullPolicy,
    Runtime, RuntimeError, VolumeSource,
};

/// `inner`, with `policy` enforced on every container and build.
pub struct Policed<R> {
    inner: Arc<R>,
    policy: Arc<Policy>,
}

impl<R> Policed<R> {
    pub fn new(inner: Arc<R>, policy: Arc<Policy>) -> Policed<R> {
        Policed { inner, policy }
    }
}

fn min_some<T: Ord + Copy>(asked: Option<T>, cap: Option<T>) -> Option<T> {
    match (asked, cap) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

fn capped(asked: Limits, cap: Limits) -> Limits {
    Limits {
        nano_cpus: min_some(asked.nano_cpus, cap.nano_cpus),
        memory: min_some(asked.memory, cap.memory),
        pids: min_some(asked.pids, cap.pids),
    }
}

fn refused(what: &str, v: &[super::Violation]) -> RuntimeError {
    let reasons: Vec<String> = v.iter().map(ToString::to_string).collect();
    RuntimeError::Denied(format!("{what}: {}", reasons.join("; ")))
}

impl<R: Runtime> Policed<R> {
    fn admit(&self, spec: &ContainerSpec) -> Result<ContainerSpec, RuntimeError> {
        let v = self.policy.check_container(spec);
        if !v.is_empty() {
            return Err(refused(&format!("container {}", spec.name), &v));
        }
        let mut spec = spec.clone();
        spec.limits = capped(spec.limits, self.policy.limits());
        Ok(spec)
    }
}

impl<R: Runtime> Runtime for Policed<R> {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.inner.ping().await
    }
    async fn create_network(
        &self,
        name: &str,
        driver: Option<&str>,
        ipv6: bool,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        if driver == Some("host") && !self.policy.allow.host_network {
            return Err(RuntimeError::Denied(format!(
                "network {name} with the host driver (policy rule `hostNetwork`)"
            )));
        }
        self.inner.create_network(name, driver, ipv6, labels).await
    }
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.remove_network(name).await
    }
    async fn network_gateway(
        &self,
        name: &str,
    ) -> Result<Option<crate::runtime::NetworkGateway>, RuntimeError> {
        self.inner.network_gateway(name).await
    }
    async fn create_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        self.inner.create_volume(name, labels).await
    }
    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.remove_volume(name).await
    }
    async fn fill_volume(
        &self,
        volume: &str,
        dir: Option<VolumeSource<'_>>,
        files: &BTreeMap<String, Vec<u8>>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        if let Some(d) = dir.map(|s| s.dir) {
            // The workspace is filled from the context: never from the server's data.
            let real = std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf());
            if self.policy.touches_protected_data(&real) {
                return Err(RuntimeError::Denied(format!(
                    "context {} is the server's own data",
                    d.display()
                )));
            }
        }
        self.inner.fill_volume(volume, dir, files, labels).await
    }
    async fn read_volume_file(
        &self,
        volume: &str,
        path: &str,
    ) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.inner.read_volume_file(volume, path).await
    }
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        platform: Option<&str>,
        auth: Option<&Credential>,
        log: &LogSink,
    ) -> Result<(), RuntimeError> {
        self.inner
            .ensure_image(image, policy, platform, auth, log)
            .await
    }
    async fn build(&self, spec: &BuildSpec, log: &LogSink) -> Result<BuildOutput, RuntimeError> {
        let v = self.policy.check_build(spec);
        if !v.is_empty() {
            return Err(refused("build", &v));
        }
        if let crate::runtime::BuildContext::Dir(d) = &spec.context {
            let real = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
            if self.policy.touches_protected_data(&real) {
                return Err(RuntimeError::Denied(format!(
                    "build context {} is the server's own data",
                    d.display()
                )));
            }
        }
        let mut spec = spec.clone();
        let cap = self.policy.limits();
        spec.limits = capped(spec.limits, Limits { pids: None, ..cap });
        self.inner.build(&spec, log).await
    }
    async fn run(&self, spec: &ContainerSpec, log: &LogSink) -> Result<i64, RuntimeError> {
        let spec = self.admit(spec)?;
        self.inner.run(&spec, log).await
    }
    async fn prepare(&self, spec: &ContainerSpec) -> Result<bool, RuntimeError> {
        let spec = self.admit(spec)?;
        self.inner.prepare(&spec).await
    }
    async fn run_prepared(&self, spec: &ContainerSpec, log: &LogSink) -> Result<i64, RuntimeError> {
        let spec = self.admit(spec)?;
        self.inner.run_prepared(&spec, log).await
    }
    async fn start_detached(
        &self,
        spec: &ContainerSpec,
        log: &LogSink,
    ) -> Result<(), RuntimeError> {
        let spec = self.admit(spec)?;
        self.inner.start_detached(&spec, log).await
    }
    async fn remove_container(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.remove_container(name).await
    }
    async fn push(
        &self,
        image: &str,
        auth: Option<&Credential>,
        log: &LogSink,
    ) -> Result<String, RuntimeError> {
        self.inner.push(image, auth, log).await
    }
    async fn image_digest(&self, image: &str) -> Result<Option<ImageIdentity>, RuntimeError> {
        self.inner.image_digest(image).await
    }
    async fn image_label(
        &self,
        image: &str,
        label: &str,
    ) -> Result<Option<Option<String>>, RuntimeError> {
        self.inner.image_label(image, label).await
    }
    async fn remove_run_resources(&self, run_id: &str) -> Result<(), RuntimeError> {
        self.inner.remove_run_resources(run_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_the_smaller_of_step_and_policy() {
        let cap = Limits {
            nano_cpus: Some(2_000_000_000),
            memory: Some(1 << 30),
            pids: None,
        };
        let asked = Limits {
            nano_cpus: Some(4_000_000_000),
            memory: Some(1 << 20),
            pids: Some(10),
        };
        assert_eq!(
            capped(asked, cap),
            Limits {
                nano_cpus: Some(2_000_000_000),
                memory: Some(1 << 20),
                pids: Some(10)
            }
        );
        assert_eq!(capped(Limits::default(), cap), cap);
    }
}
