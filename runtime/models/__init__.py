"""The networks of InfiniteTalk: DiT with audio adapter, VAE, T5, CLIP, wav2vec2 features."""
