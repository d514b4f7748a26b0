//! Secrets kept in files (Kubernetes secrets): passwords, bearer tokens,
//! keys. They are read without the line break editors and `echo` leave at
//! the end, and a token is read again on every use, so that a rotated
//! secret takes effect without a restart.

use std::path::{Path, PathBuf};

/// The trimmed contents of `path`; an empty secret is an error, never
/// "no secret".
pub fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        anyhow::bail!("{} is empty", path.display());
    }
    Ok(secret.to_owned())
}

/// A bearer token shared by the controller and its sidecars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFile(pub PathBuf);

impl TokenFile {
    /// The token now, read off the async workers.
    pub async fn read(&self) -> anyhow::Result<String> {
        let path = self.0.clone();
        tokio::task::spawn_blocking(move || read_secret(&path)).await?
    }

    /// The `authorization` header value that presents `token`.
    pub fn header(token: &str) -> String {
        format!("Bearer {token}")
    }

    /// Whether `presented` (an `authorization` header value) carries
    /// `token`. The comparison takes the same time wherever the first
    /// difference is, so that a guesser learns nothing from timing but the
    /// token's length.
    pub fn admits(token: &str, presented: Option<&[u8]>) -> bool {
        let Some(presented) = presented.and_then(|p| p.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let token = token.as_bytes();
        if presented.len() != token.len() {
            return false;
        }
        let differ = presented
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(differ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_admitted() {
        let token = "s3cret-token";
        assert!(TokenFile::admits(token, Some(b"Bearer s3cret-token")));
        for presented in [
            &b"Bearer s3cret-tokeN"[..],
            b"Bearer s3cret-token ",
            b"Bearer ",
            b"s3cret-token",
            b"Basic s3cret-token",
        ] {
            assert!(!TokenFile::admits(token, Some(presented)), "{presented:?}");
        }
        assert!(!TokenFile::admits(token, None));
    }

    #[test]
    fn secrets_lose_their_line_break_and_cannot_be_empty() {
        let dir = std::env::temp_dir().join(format!("sluice-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "abc\n").expect("write");
        assert_eq!(read_secret(&file).expect("read"), "abc");
        std::fs::write(&file, "\n").expect("write");
        assert!(read_secret(&file).is_err());
        assert!(read_secret(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
