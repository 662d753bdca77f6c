"""JAX / Flax / Optax models (metric-learning encoder, multimodal VAE): later issues."""
