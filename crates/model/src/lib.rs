//! Qwen2 model with TransformerLens hook points.
