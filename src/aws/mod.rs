//! The AWS side: credentials, the token signer and the token cache. It knows nothing of
//! wire protocols.

pub mod cache;
pub mod credentials;
pub mod token;

pub use cache::{Token, TokenCache, TokenEntry, TokenError, TokenKey};
pub use credentials::{CredentialChain, CredentialsFailure};
