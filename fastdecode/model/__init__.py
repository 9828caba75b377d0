"""One decoder implementation for the Llama family, and its loaders."""
