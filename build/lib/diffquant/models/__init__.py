"""Model adapters: the bundled reference models, their classifier, and local diffusers loading."""
