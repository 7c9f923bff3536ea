//! Data-stage messages (placeholder until the codec lands).
