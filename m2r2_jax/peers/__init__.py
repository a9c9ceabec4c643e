"""The peers' trained parts (what a peer method learns on the frozen base), one module per peer."""
