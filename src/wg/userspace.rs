// TEMPORARY placeholder until the userspace device lands; not committed.
#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error("permission denied: {0}")]
    Permission(String),
    #[error("other: {0}")]
    Other(String),
}
pub struct UserspaceDevice;
impl UserspaceDevice {
    pub async fn start(_name: &str) -> Result<Self, UserspaceError> {
        Err(UserspaceError::Other("not yet".into()))
    }
    pub async fn shutdown(self) {}
}
