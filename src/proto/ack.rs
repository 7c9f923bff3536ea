//! ACK window accounting (placeholder until the codec lands).
