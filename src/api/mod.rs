//! The Prefinery REST API v2 client: typed models, errors, the shared rate
//! limiter and pagination.

pub mod client;
pub mod error;
pub mod limiter;
pub mod models;

pub use client::{ApiKey, Client, ClientStats, PAGE_SIZE, Page, Reply, RetryPolicy};
pub use error::{ApiError, ApiMessage, ApiMessages, Op, Unreachable};
pub use limiter::{Limiter, Quota, RateClass, RateOverride};
pub use models::{Beta, Pagination, Point, Reward, Suppression, Tester, TesterInput};
