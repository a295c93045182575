"""The meshc compiler: policy repo -> diagnostics, bundles and releases; plans, control plane, CLI."""
