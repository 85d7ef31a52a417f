"""Everything that touches PyTorch: weight import and tensor exchange with PyTorch peers."""
