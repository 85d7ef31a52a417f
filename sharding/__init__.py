"""Meshes, the logical-to-mesh rules tables, layouts, padding plans and the HLO census."""
