//! Fencing tokens of the embedded store. One vitals process owns its data
//! directory (see [`crate::db::embedded`]), so its lock table
//! ([`super::table`]) is the only place a lock can be held; what must
//! outlive the process is the token counter. Tokens are handed out from
//! blocks reserved in the database (hi-lo), so a restart continues above
//! everything handed out before, and a grant costs a database write only
//! once per block.

use std::sync::Arc;

use crate::{
    db::EmbeddedDb,
    error::{Corrupt, Error, Result},
};

/// Fencing tokens reserved per write to the database.
const TOKEN_BLOCK: u64 = 1000;

/// Fencing tokens handed out in order from blocks reserved in the database.
#[derive(Debug, Clone)]
pub struct FencingTokens {
    db: EmbeddedDb,
    block: Arc<tokio::sync::Mutex<TokenBlock>>,
}

/// Tokens `next..=last` are reserved and not handed out yet.
#[derive(Debug)]
struct TokenBlock {
    next: u64,
    last: u64,
}

impl FencingTokens {
    /// Tokens of the store `db`.
    pub fn new(db: EmbeddedDb) -> Self {
        FencingTokens {
            db,
            // Empty: the first token reserves a block.
            block: Arc::new(tokio::sync::Mutex::new(TokenBlock { next: 1, last: 0 })),
        }
    }

    /// The next token: above every token handed out before, by this process
    /// or any earlier one on the same data directory.
    pub async fn next(&self) -> Result<u64> {
        let mut block = self.block.lock().await;
        if block.next > block.last {
            let mut conn = self.db.writer().await?;
            let reserved: i64 = sqlx::query_scalar(
                "UPDATE fencing_tokens SET reserved_through = reserved_through + $1 WHERE id = 1 \
                 RETURNING reserved_through",
            )
            .bind(i64::try_from(TOKEN_BLOCK).unwrap_or(1000))
            .fetch_one(&mut *conn)
            .await?;
            let last = u64::try_from(reserved)
                .ok()
                .filter(|last| *last >= TOKEN_BLOCK)
                .ok_or(Error::Corrupt(Corrupt::FencingTokenBlock(reserved)))?;
            *block = TokenBlock {
                next: last - TOKEN_BLOCK + 1,
                last,
            };
        }
        let token = block.next;
        block.next += 1;
        Ok(token)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fencing_tokens_rise_across_reopening_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("--database-url=sqlite://{}/vitals.db", dir.path().display());
        let config = crate::Config::from_flags([url]).unwrap();
        let mut last = 0;
        for _ in 0..3 {
            let db = EmbeddedDb::open(&config).await.unwrap();
            let tokens = FencingTokens::new(db.clone());
            for _ in 0..1500 {
                let token = tokens.next().await.unwrap();
                assert!(token > last, "{token} after {last}");
                last = token;
            }
            db.close().await;
        }
    }
}
