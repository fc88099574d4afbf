"""Backend-specific kernels behind ``keras.ops`` layers; see each module for when it is used."""
